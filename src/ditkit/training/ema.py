"""Exponential moving average of the weights (DiT keeps one with decay 0.9999 and samples from it).

`update_ema` is the pure operation; `DiffusionModule` owns the fp32 shadow copy (a submodule, so it
lands in every checkpoint and is sharded exactly like the model under FSDP2) and calls it once per
optimizer step that was taken.
"""

import copy

import torch
from torch import nn
from torch.distributed.tensor import DTensor


def local(t: torch.Tensor) -> torch.Tensor:
    """The tensor this rank holds: the local shard of an FSDP2 DTensor, the tensor itself
    otherwise."""
    return t.to_local() if isinstance(t, DTensor) else t


def ema_decay(decay: float, num_updates: int, warmup: bool) -> float:
    """Decay of update number `num_updates` (0-based).

    With warmup the decay is min(decay, (1 + n) / (10 + n)) (TensorFlow's ExponentialMovingAverage
    `num_updates` rule): early on the average forgets the random initialisation quickly, which is
    what makes a run of a few thousand steps (the quickstart) sample from a useful EMA.
    """
    if not warmup:
        return decay
    return min(decay, (1.0 + num_updates) / (10.0 + num_updates))


@torch.no_grad()
def update_ema(ema_params: list[torch.Tensor], params: list[torch.Tensor], decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * param, in place, as one fused `_foreach_lerp_`.

    ema_params, params: matching lists of tensors or DTensors (FSDP2 shards the EMA copy exactly
    like the model, so the local shards line up elementwise and no communication is needed).
    The shadow is fp32; parameters in another dtype (bf16-true training) are upcast first.
    """
    ema_local = [local(e) for e in ema_params]
    src = [local(p).to(e.dtype) for e, p in zip(ema_local, params)]
    torch._foreach_lerp_(ema_local, src, 1.0 - decay)


def make_shadow(model: nn.Module) -> nn.Module:
    """An fp32 copy of `model` that takes no gradients: the EMA starts from the initial weights."""
    shadow = copy.deepcopy(model).float().eval()
    shadow.requires_grad_(False)
    return shadow
