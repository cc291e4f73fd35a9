"""Prediction and loss spaces of rectified flow: velocity v, clean data x, noise eps.

With x_t = (1 - t) x + t n, n = noise_scale * eps (t = 1 pure noise), any one of (v, x, eps) and
x_t give the other two:
    v = n - x,   x = x_t - t v,   n = x_t + (1 - t) v,
    from x:   v = (x_t - x) / t,          n = (x_t - (1 - t) x) / t,
    from eps: x = (x_t - t n) / (1 - t),  v = (n - x_t) / (1 - t).
The divisions are clipped away from 0 by `t_eps`: JiT (Li & He 2025, arXiv 2511.13720; LTH14/JiT
denoiser.py, `(1 - t).clamp_min(self.t_eps)` in its convention t = 1 clean, t_eps = 0.05) divides by
the clipped factor both in the loss and when sampling. Every conversion is affine in the prediction
with coefficients that depend on t only, so guidance (a combination of two predictions with
weights summing to 1) commutes with it.
"""

from __future__ import annotations

import torch

SPACES = ("v", "x", "eps")


def check_space(kind: str, value: str) -> None:
    if value not in SPACES:
        raise ValueError(f"unknown objective.{kind} {value!r}; choose one of {', '.join(SPACES)}")


def convert(
    pred: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    source: str,
    target: str,
    noise_scale: float = 1.0,
    t_eps: float = 0.0,
) -> torch.Tensor:
    """`pred` in space `source` -> space `target`, at x_t: (N, C, H, W) and t: (N,) or a number.

    Divisions by t (from x) and by 1 - t (from eps) use max(., t_eps). Exact (no clipping in the
    way) in whatever dtype the inputs have: float64 in the tests."""
    check_space("prediction", source)
    check_space("loss_space", target)
    if source == target:
        return pred
    if not torch.is_tensor(t):
        t = torch.tensor(float(t), dtype=x_t.dtype, device=x_t.device)
    t = t.to(x_t.dtype).reshape(-1, *([1] * (x_t.ndim - 1)))
    # Through the velocity: (source -> v) then (v -> target).
    if source == "v":
        v = pred
    elif source == "x":
        v = (x_t - pred) / t.clamp_min(t_eps)
    else:
        v = (noise_scale * pred - x_t) / (1 - t).clamp_min(t_eps)
    if target == "v":
        return v
    if target == "x":
        # From eps straight to x keeps x = (x_t - t n) / (1 - t) exact (one clip, not two).
        if source == "eps":
            return (x_t - t * noise_scale * pred) / (1 - t).clamp_min(t_eps)
        return x_t - t * v
    if source == "x":
        return (x_t - (1 - t) * pred) / t.clamp_min(t_eps) / noise_scale
    return (x_t + (1 - t) * v) / noise_scale
