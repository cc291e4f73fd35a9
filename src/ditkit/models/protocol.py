"""The contract a backbone meets: what training, sampling and evaluation may assume of a network.

A backbone maps a noisy input, a time and a condition to an output of the input's layout. It knows
nothing of diffusion (no schedules, no losses, no samplers): the objective owns all of that. FSDP2,
torch.compile and activation checkpointing are applied to its `blocks` from outside
(`ditkit.training.parallel`), so a backbone is plain PyTorch. docs/extending.md walks through adding
one.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import nn

# The attributes `check_backbone` asks for, with what each is for.
REQUIRED = {
    "forward": "forward(x: (N, C, H, W), t: (N,), **condition) -> (N, C_out, H, W)",
    "blocks": "the repeated units (an nn.ModuleList or list of modules) that FSDP2 shards, "
    "torch.compile compiles and activation checkpointing wraps, one by one",
    "condition_keys": "the batch fields forward takes besides x and t, e.g. ('y',) for class "
    "labels or ('context', 'pooled') for text",
    "null_condition": "null_condition(**condition) -> dict: the condition of classifier-free "
    "guidance's unconditional half (DiT: the null class; MMDiT: zero text embeddings)",
    "in_channels": "C, the channels of x",
    "input_size": "H = W, the latent grid the model is built for",
    "learn_sigma": "True when C_out = 2 C (a learned variance follows the prediction)",
    "forward_flops": "forward_flops(batch_size) -> int, analytic FLOPs of one forward (for MFU)",
}

# Optional capabilities: what a backbone may declare, and which features ask for it.
OPTIONAL = {
    "accepts_prefix": "True when forward(..., prefix=(N, K, D)) takes K extra tokens in the hidden "
    "width, put before the image tokens, seen by every block and dropped before the final layer "
    "(block outputs then lead with them); alignment=reg needs it (DiT has it)",
}


def accepts_prefix(model: object) -> bool:
    """Whether `model` declares the optional `accepts_prefix` capability (OPTIONAL)."""
    return bool(getattr(model, "accepts_prefix", False))


@runtime_checkable
class Backbone(Protocol):
    """A denoising network. Class-conditional backbones (condition_keys == ("y",)) also have
    `num_classes`; label `num_classes` is their null class."""

    blocks: nn.ModuleList
    condition_keys: tuple[str, ...]
    in_channels: int
    input_size: int
    learn_sigma: bool

    def forward(self, x: torch.Tensor, t: torch.Tensor, **condition: torch.Tensor) -> torch.Tensor:
        """x: (N, C, H, W), t: (N,) -> (N, C_out, H, W)."""
        ...

    def null_condition(self, **condition: torch.Tensor) -> dict[str, torch.Tensor]:
        """The unconditional counterpart of `condition` (same keys and shapes)."""
        ...

    def forward_flops(self, batch_size: int = 1) -> int:
        """FLOPs (2 x multiply-adds) of one forward at `input_size`."""
        ...


def check_backbone(model: object, where: str = "model") -> None:
    """Raise TypeError naming every attribute of the Backbone contract that `model` lacks."""
    missing = [name for name in REQUIRED if not hasattr(model, name)]
    if missing:
        lines = "\n".join(f"  {name}: {REQUIRED[name]}" for name in missing)
        raise TypeError(
            f"{where} ({type(model).__name__}) does not meet the Backbone contract "
            f"(ditkit.models.Backbone, docs/extending.md); it lacks:\n{lines}"
        )
    keys = model.condition_keys
    if not isinstance(keys, tuple) or not all(isinstance(k, str) for k in keys):
        raise TypeError(
            f"{where}.condition_keys must be a tuple of batch field names, got {keys!r}"
        )
    if tuple(keys) == ("y",) and not hasattr(model, "num_classes"):
        raise TypeError(
            f"{where} ({type(model).__name__}) takes class labels (condition_keys ('y',)) but has "
            "no num_classes: evaluation draws balanced labels over range(num_classes)"
        )
