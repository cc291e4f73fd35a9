"""Throughput and model FLOPs utilisation (MFU).

MFU = achieved model FLOP/s / peak FLOP/s of the devices (PaLM, Chowdhery et al. 2022, app. B):
training costs 3x the forward FLOPs (forward + backward at 2x), whatever activation checkpointing
recomputes. Peaks are the dense (no sparsity) tensor-core numbers from NVIDIA's datasheets.
"""

import time

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

# Dense bf16/fp16 tensor-core peak FLOP/s per GPU, matched against torch.cuda.get_device_name()
# in this order (more specific names first).
PEAK_FLOPS_16BIT = (
    ("GB200", 2.5e15),
    ("B200", 2.25e15),
    ("B100", 1.75e15),
    ("H200 NVL", 835e12),
    ("H200", 989e12),
    ("GH200", 989e12),
    ("H100 NVL", 835e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM ("H100 80GB HBM3")
    ("H800", 989e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
    ("A10", 125e12),
    ("RTX A6000", 155e12),
    ("V100", 125e12),  # fp16 only
)


def peak_flops(device_name: str, precision: str) -> float | None:
    """Peak FLOP/s of one device for a Lightning precision string, or None when unknown.

    Only 16-bit precisions ("bf16-mixed", "16-mixed", "bf16-true", ...) have a table entry: fp32
    runs on different units (TF32 or CUDA cores), so no MFU is reported for them."""
    if "16" not in str(precision):
        return None
    for key, flops in PEAK_FLOPS_16BIT:
        if key.lower() in device_name.lower():
            if key == "V100" and "bf16" in str(precision):
                return None
            return flops
    return None


class Throughput(Callback):
    """Logs perf/imgs_per_sec (all ranks together) and perf/mfu every `log_every_n_steps` optimizer
    steps.

    The first window starts after the first step, so start-up and compilation are not counted."""

    def __init__(self, log_every_n_steps: int = 100):
        if log_every_n_steps < 1:
            raise ValueError(f"log_every_n_steps must be >= 1, got {log_every_n_steps}")
        self.log_every_n_steps = log_every_n_steps
        self._t0: float | None = None
        self._images = 0
        self._flops_per_image: float | None = None
        self._peak: float | None = None

    def on_train_start(self, trainer: "L.Trainer", pl_module: "L.LightningModule") -> None:
        self._flops_per_image = 3.0 * pl_module.model.forward_flops(1)
        device = pl_module.device
        if device.type == "cuda":
            self._peak = peak_flops(torch.cuda.get_device_name(device), trainer.precision)

    def _sync(self, device: torch.device) -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._t0 is None:
            self._sync(pl_module.device)
            self._t0, self._images = time.perf_counter(), 0
            return
        self._images += int(batch["x"].shape[0])
        stepped = (batch_idx + 1) % trainer.accumulate_grad_batches == 0
        if not stepped or trainer.global_step % self.log_every_n_steps:
            return
        self._sync(pl_module.device)
        elapsed = time.perf_counter() - self._t0
        # Every rank sees a batch of the same size, so the global rate is the local one times the
        # world.
        imgs_per_sec = self._images * trainer.world_size / elapsed
        metrics = {"perf/imgs_per_sec": imgs_per_sec}
        if self._flops_per_image is not None and self._peak is not None:
            metrics["perf/mfu"] = (
                imgs_per_sec * self._flops_per_image / (self._peak * trainer.world_size)
            )
        pl_module.log_dict(metrics, on_step=True, on_epoch=False)
        self._t0, self._images = time.perf_counter(), 0
