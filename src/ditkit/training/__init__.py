"""Training: the LightningModule, EMA, preemption, FSDP2 and callbacks (checkpoints:
ditkit.checkpoints)."""

from .data_health import DamagedDataError, DataHealth
from .ema import ema_decay, update_ema
from .module import DiffusionModule, NonFiniteLossError
from .preemption import Preemption
from .samples import DigitsScore, SampleGrid
from .throughput import Throughput, peak_flops

__all__ = [
    "DamagedDataError",
    "DataHealth",
    "DiffusionModule",
    "DigitsScore",
    "NonFiniteLossError",
    "Preemption",
    "SampleGrid",
    "Throughput",
    "ema_decay",
    "peak_flops",
    "update_ema",
]
