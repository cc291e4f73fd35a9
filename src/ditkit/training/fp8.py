"""FP8 training (`module.fp8=true`): torchao's float8 training with rowwise scaling
(`torchao.float8.convert_to_float8_training`, recipe "rowwise": per-row scales of the activations
and weights, `torch._scaled_mm` on FP8 tensor cores; pytorch/ao torchao/float8/README.md).

Applied from outside the model, before `compile_blocks`: every `nn.Linear` inside the blocks whose
dimensions are multiples of 16 (what `_scaled_mm` takes) becomes a `Float8Linear`; the embedders and
the final layer stay in bf16 (torchtitan leaves the output layer out alike). Weights, the optimizer
and the EMA stay in their own dtypes: checkpoints are unchanged. Needs an NVIDIA GPU with FP8 tensor
cores (compute capability >= 8.9: H100, H200, L40S, B200), bf16-mixed, torch.compile (the casts and
scales are fused only when compiled; eager FP8 is slower than bf16) and torchao, an optional extra
(`pip install 'ditkit[fp8]'`; torchao declares no dependency on torch, so it leaves torch alone).
"""

from __future__ import annotations

import torch
from torch import nn

FP8_CAPABILITY = (8, 9)


def check_fp8(compile: bool, precision: str | None = None) -> None:
    """Refuse module.fp8=true, before any work, where it cannot run; each error names the fix."""
    if not torch.cuda.is_available():
        raise RuntimeError(
            "module.fp8=true runs on NVIDIA GPUs with FP8 tensor cores (compute capability >= 8.9: "
            "H100, H200, L40S, B200); no CUDA device is visible here. Set module.fp8=false (bf16-mixed "
            "is the fastest precision on this machine)."
        )
    capability = torch.cuda.get_device_capability()
    if capability < FP8_CAPABILITY:
        raise RuntimeError(
            f"module.fp8=true needs FP8 tensor cores (compute capability >= 8.9); "
            f"{torch.cuda.get_device_name()} has {capability[0]}.{capability[1]}. Set module.fp8=false."
        )
    try:
        import torchao.float8  # noqa: F401
    except ImportError:
        raise RuntimeError(
            "module.fp8=true needs torchao (float8 training): pip install 'ditkit[fp8]' "
            "(or pip install torchao, a release built for this torch)"
        ) from None
    if not compile:
        raise ValueError(
            "module.fp8=true needs module.compile=true: torchao fuses its FP8 casts and scales only "
            "under torch.compile, and eager FP8 runs slower than bf16"
        )
    if precision is not None and "bf16" not in str(precision):
        raise ValueError(
            f"module.fp8=true computes the non-FP8 parts in bf16: set trainer.precision=bf16-mixed "
            f"(got {precision})"
        )


def _fp8_eligible(module: nn.Module, fqn: str) -> bool:
    """Linear layers inside the blocks whose in and out features are multiples of 16."""
    return (
        isinstance(module, nn.Linear)
        and module.in_features % 16 == 0
        and module.out_features % 16 == 0
    )


def convert_fp8(model: nn.Module) -> list[str]:
    """Swap the eligible linear layers of `model.blocks` for torchao Float8Linear (rowwise
    scaling), in place. Returns the converted layers' names (relative to model.blocks)."""
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    before = {name for name, m in model.blocks.named_modules() if isinstance(m, nn.Linear)}
    convert_to_float8_training(
        model.blocks,
        config=Float8LinearConfig.from_recipe_name("rowwise"),
        module_filter_fn=_fp8_eligible,
    )
    return sorted(
        name
        for name, m in model.blocks.named_modules()
        if name in before and type(m).__name__ == "Float8Linear"
    )
