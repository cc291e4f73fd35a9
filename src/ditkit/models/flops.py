"""Forward FLOPs of any backbone in one place (used by the benchmarks, the model table and
`perf/mfu`).

FLOPs are 2 x multiply-adds of the matmuls and convolutions (attention's QK^T and AV included);
norms, activations and element-wise ops are not counted. The DiT paper's "Gflops" are multiply-adds:
divide by 2 to compare (DiT-XL/2 at 256 px: 118.6 G).
"""

import torch
from torch import nn
from torch.func import functional_call
from torch.utils.flop_counter import FlopCounterMode


def count_flops(model: nn.Module, *inputs, **kwargs) -> int:
    """FLOPs of model(*inputs, **kwargs) counted op by op with
    `torch.utils.flop_counter.FlopCounterMode`.

    The call runs on the meta device: parameters, buffers and tensor inputs are replaced by meta
    tensors of the same shapes, so nothing is computed or allocated and the model itself is left
    untouched (any device, any size). On meta, `scaled_dot_product_attention` decomposes into the
    two batched matmuls the counter sees (the CPU kernel would go uncounted).
    """
    state = {name: _meta(t) for name, t in (*model.named_parameters(), *model.named_buffers())}
    meta_inputs = [_meta(v) for v in inputs]
    meta_kwargs = {k: _meta(v) for k, v in kwargs.items()}
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        functional_call(model, state, tuple(meta_inputs), meta_kwargs, strict=True)
    return counter.get_total_flops()


def forward_flops(model: nn.Module, *inputs, **kwargs) -> int:
    """Forward FLOPs of model(*inputs, **kwargs) for this input.

    A class-conditional backbone called as model(x, t, y) at its own latent size (x: (N,
    in_channels, input_size, input_size)) answers with its analytic
    `model.forward_flops(batch_size=N)`; any other model or input (MMDiT's (x, t, context, pooled),
    another resolution) is counted by `count_flops`.
    """
    analytic = getattr(model, "forward_flops", None)
    if analytic is not None and len(inputs) == 3 and not kwargs and _native(model, inputs[0]):
        return analytic(batch_size=inputs[0].shape[0])
    return count_flops(model, *inputs, **kwargs)


def _native(model: nn.Module, x) -> bool:
    size, channels = getattr(model, "input_size", None), getattr(model, "in_channels", None)
    return isinstance(x, torch.Tensor) and tuple(x.shape[1:]) == (channels, size, size)


def _meta(value):
    return torch.empty_like(value, device="meta") if isinstance(value, torch.Tensor) else value
