"""Classifier-free guidance at the model level (Ho & Salimans, 2022), shared by every class-conditional
backbone (DiT, U-Net) so that their `forward_with_cfg` is one function."""

import torch
from torch import nn


def forward_with_cfg(
    model: nn.Module,
    x: torch.Tensor,
    t: torch.Tensor,
    y: torch.Tensor,
    cfg_scale: float,
    guidance_channels: int | None = None,
) -> torch.Tensor:
    """Guided output of `model(x, t, y)` on a batch whose second half holds the null labels.

    x: (2N, C, H, W) (only the first half is read; the second half reuses it), t: (2N,), y: (2N,)
    with y[N:] = null class. Returns (2N, C_out, H, W): eps = eps_null + s (eps_cond - eps_null) on the
    first `guidance_channels` output channels (None = all `model.in_channels` eps channels; 3 reproduces
    the DiT reference, which guides only 3 of 4), duplicated into both halves; the remaining channels
    (a learned variance) are each half's own output.
    """
    half = x[: len(x) // 2]
    out = model(torch.cat([half, half]), t, y)
    k = model.in_channels if guidance_channels is None else guidance_channels
    eps, rest = out[:, :k], out[:, k:]
    cond, uncond = eps.chunk(2)
    guided = uncond + cfg_scale * (cond - uncond)
    return torch.cat([torch.cat([guided, guided]), rest], dim=1)
