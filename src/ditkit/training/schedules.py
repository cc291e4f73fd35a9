"""Learning-rate schedules (the `lr_schedule` config group): a pure factor function of the optimizer
step, and the LambdaLR that applies it to every parameter group's own base lr.

Every schedule starts with a linear warm-up over `warmup_steps` optimizer steps (Goyal et al. 2017):
factor (s + 1) / warmup_steps at step s. After it:
  constant       1
  cosine         final + (1 - final) (1 + cos(pi p)) / 2      (Loshchilov & Hutter 2017, SGDR eq. 5)
  linear_decay   final + (1 - final) (1 - p)                   (RAE: 2e-4 -> 2e-5)
with p = (s - warmup_steps) / (total_steps - warmup_steps) clipped to [0, 1] and final =
final_lr_fraction. `warmup` is `constant` with a warm-up (its own group entry, for readability).
"""

from __future__ import annotations

import math

import torch

KINDS = ("constant", "warmup", "cosine", "linear_decay")


def lr_factor(
    step: int,
    kind: str,
    warmup_steps: int = 0,
    total_steps: int | None = None,
    final_lr_fraction: float = 0.0,
) -> float:
    """The multiplier of the base lr at optimizer step `step` (0-based)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind in ("constant", "warmup"):
        return 1.0
    span = max(1, total_steps - warmup_steps)
    p = min(1.0, max(0.0, (step - warmup_steps) / span))
    if kind == "cosine":
        return final_lr_fraction + (1 - final_lr_fraction) * 0.5 * (1 + math.cos(math.pi * p))
    return final_lr_fraction + (1 - final_lr_fraction) * (1 - p)


def lr_schedule(
    optimizer: torch.optim.Optimizer,
    kind: str = "constant",
    warmup_steps: int = 0,
    total_steps: int | None = None,
    final_lr_fraction: float = 0.0,
) -> torch.optim.lr_scheduler.LRScheduler | None:
    """A per-step LambdaLR for `optimizer`, or None for a constant lr without warm-up (the optimizer
    alone then sets the lr, exactly as DiT trains). Checks the settings before training starts."""
    if kind not in KINDS:
        raise ValueError(f"lr_schedule kind {kind!r}; choose one of lr_schedule={'|'.join(KINDS)}")
    if warmup_steps < 0:
        raise ValueError(f"lr_schedule.warmup_steps must be >= 0, got {warmup_steps}")
    if not 0.0 <= final_lr_fraction <= 1.0:
        raise ValueError(
            f"lr_schedule.final_lr_fraction must lie in [0, 1], got {final_lr_fraction}"
        )
    if kind in ("cosine", "linear_decay") and (total_steps is None or total_steps <= warmup_steps):
        raise ValueError(
            f"lr_schedule={kind} decays over total_steps (default trainer.max_steps), which must "
            f"exceed lr_schedule.warmup_steps={warmup_steps}; got total_steps={total_steps}"
        )
    if kind in ("constant", "warmup") and warmup_steps == 0:
        return None
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: lr_factor(step, kind, warmup_steps, total_steps, final_lr_fraction),
    )
