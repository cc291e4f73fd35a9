"""Images from text prompts (text-to-image models such as MMDiT): `per_prompt` samples of each
prompt, in prompt-major order, so a grid with `per_prompt` columns has one row per prompt.

The starting noise of sample i is a function of (seed, i) only (`sample_noise`), and the sampler's
own draws come from the global RNG seeded by (seed, first index of the batch) inside `fork_rng`, so
the same command gives the same images whatever the batch size of the text encoders.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from .sampling import sample_noise, to_uint8


def read_prompts(path: str | Path) -> list[str]:
    """One prompt per line (blank lines skipped)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompts={path}: no such file (one prompt per line)")
    prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"prompts={path} holds no prompt (one per line)")
    return prompts


@torch.no_grad()
def sample_prompts(
    model: torch.nn.Module,
    objective: Any,
    decode: Callable[[torch.Tensor], torch.Tensor],
    encoders: Callable[[list[str]], tuple[torch.Tensor, torch.Tensor]],
    prompts: list[str],
    per_prompt: int,
    *,
    seed: int,
    batch_size: int,
    sample_kwargs: dict[str, Any],
    device: torch.device | str,
    autocast: Callable[[], Any],
    progress: bool = True,
) -> torch.Tensor:
    """(len(prompts) * per_prompt, 3, H, W) uint8 on CPU: sample j of prompt p at index p *
    per_prompt + j.

    encoders: prompts -> (context (P, L, D), pooled (P, D')); sample_kwargs go to `objective.sample`
    (sampler, steps, cfg_scale, ...: guidance pairs each prompt with the model's null condition).
    decode: latents (n, C, h, w) -> images (n, 3, H, W) in [-1, 1]."""
    if per_prompt < 1 or batch_size < 1:
        raise ValueError(
            f"per_prompt and batch_size must be positive, got {per_prompt} and {batch_size}"
        )
    context, pooled = encoders(prompts)
    which = torch.arange(len(prompts)).repeat_interleave(per_prompt)
    shape = (model.in_channels, model.input_size, model.input_size)
    images = []
    devices = [torch.device(device)] if torch.device(device).type == "cuda" else []
    for start in tqdm(range(0, len(which), batch_size), disable=not progress, desc="prompts"):
        stop = min(start + batch_size, len(which))
        noise = sample_noise(start, stop, shape, seed).to(device)
        kwargs = {
            "context": context[which[start:stop]].to(device),
            "pooled": pooled[which[start:stop]].to(device),
        }
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(int(np.random.SeedSequence([seed, start, 1]).generate_state(1)[0]))
            with autocast():
                latents = objective.sample(model, noise, model_kwargs=kwargs, **sample_kwargs)
        images.append(to_uint8(decode(latents.float())).cpu())
    return torch.cat(images)
