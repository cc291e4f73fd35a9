"""Training: the LightningModule, EMA, checkpointing, preemption, FSDP2 and callbacks."""

from .checkpointing import AtomicModelCheckpoint, CheckpointSaveError, find_resume_checkpoint
from .ema import ema_decay, update_ema
from .module import DiffusionModule, NonFiniteLossError
from .parallel import consolidate_checkpoint
from .preemption import Preemption
from .samples import DigitsScore, SampleGrid
from .throughput import Throughput, peak_flops

__all__ = [
    "AtomicModelCheckpoint",
    "CheckpointSaveError",
    "DiffusionModule",
    "DigitsScore",
    "NonFiniteLossError",
    "Preemption",
    "SampleGrid",
    "Throughput",
    "consolidate_checkpoint",
    "ema_decay",
    "find_resume_checkpoint",
    "peak_flops",
    "update_ema",
]
