"""Sampling at scale: a global plan of batches shared out over ranks, balanced labels, per-sample
noise.

Every random draw depends on the global sample index and the seed only: the label of sample i, its
starting noise x_T (a generator seeded from (seed, i)), and the sampler's own draws (the global
torch RNG seeded from (seed, first index of the batch) inside `fork_rng`, so a training run's RNG
stream is left as it was). The same seed and batch size therefore give the same images on 1 rank or
8, and a resumed run continues the very same samples.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch


def balanced_labels(num_samples: int, num_classes: int, seed: int) -> torch.Tensor:
    """(num_samples,) int64: each class floor(N/K) or ceil(N/K) times, in a seeded random order."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(num_samples) % num_classes
    return labels[torch.randperm(num_samples, generator=g)]


def _sub_seed(*keys: int) -> int:
    """An independent 63-bit seed for the stream named by non-negative `keys` (numpy's SeedSequence
    hashing)."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1, np.uint64)[0] >> np.uint64(1))


def sample_noise(start: int, stop: int, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """x_T for global samples start..stop-1: (stop - start, *shape) float32, one generator per
    sample."""
    return torch.stack(
        [
            torch.randn(shape, generator=torch.Generator().manual_seed(_sub_seed(seed, i)))
            for i in range(start, stop)
        ]
    )


def plan_batches(
    num_samples: int, batch_size: int, rank: int = 0, world_size: int = 1
) -> list[tuple[int, int]]:
    """This rank's (start, stop) global index ranges: batch b of ceil(N/B) goes to rank b %
    world_size."""
    if num_samples < 1 or batch_size < 1:
        raise ValueError(
            f"num_samples and batch_size must be positive, got {num_samples} and {batch_size}"
        )
    starts = range(0, num_samples, batch_size)
    return [
        (s, min(s + batch_size, num_samples))
        for b, s in enumerate(starts)
        if b % world_size == rank
    ]


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) float in [-1, 1] -> uint8 in [0, 255] (round to nearest, as the ADM samplers
    store them)."""
    return ((images.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


@torch.no_grad()
def generate_batch(
    model: Callable[..., torch.Tensor],
    objective: Any,
    decode: Callable[[torch.Tensor], torch.Tensor],
    labels: torch.Tensor,
    noise: torch.Tensor,
    *,
    seed: int,
    start: int,
    sample_kwargs: dict[str, Any],
    autocast: Callable[[], Any],
) -> torch.Tensor:
    """One batch of images: labels (n,), noise (n, C, h, w) on the model's device -> (n, 3, H, W)
    uint8 on CPU.

    sample_kwargs go to `objective.sample` (sampler, steps, cfg_scale, guidance_channels,
    guidance_interval). decode maps latents (n, C, h, w) -> images (n, 3, H, W) in [-1, 1]; it runs
    in float32 outside `autocast`.
    """
    devices = [noise.device] if noise.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(
            _sub_seed(seed, start, 1)
        )  # the sampler's draws: a stream apart from the x_T streams
        with autocast():
            latents = objective.sample(model, noise, model_kwargs={"y": labels}, **sample_kwargs)
    return to_uint8(decode(latents.float())).cpu()
