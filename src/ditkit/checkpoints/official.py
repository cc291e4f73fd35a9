"""Released DiT weights in, EMA weights out (safetensors).

The official files (DiT-XL-2-256x256.pt, DiT-XL-2-512x512.pt) are a bare state_dict of the EMA
model; checkpoints of the reference training script are {"model", "ema", "opt", "args"}. Both load
here.
"""

import math
import os

import torch
from safetensors.torch import save_file

from ditkit.models import DIT_VARIANTS, DiT

from .atomic import atomic_path
from .reading import UNREADABLE, load_torch_file

# Heads cannot be read off the tensors; the published widths each have one head count.
_HEADS_BY_WIDTH = {spec["hidden_size"]: spec["num_heads"] for spec in DIT_VARIANTS.values()}
_REQUIRED = (
    "x_embedder.proj.weight",
    "pos_embed",
    "y_embedder.embedding_table.weight",
    "final_layer.linear.weight",
)


def read_state_dict(path: str | os.PathLike, prefer: str = "ema") -> dict[str, torch.Tensor]:
    """Tensors of a `.pt` file (weights_only) or `.safetensors`; from a training dict, the `prefer`
    entry."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(path)
        obj = load_torch_file(path)
    except UNREADABLE as err:
        raise ValueError(
            f"could not read {path!r} as a PyTorch or safetensors checkpoint ({err}); "
            "the file may be truncated or of another kind: download or export it again"
        ) from err
    if isinstance(obj, dict) and prefer in obj and isinstance(obj[prefer], dict):
        obj = obj[prefer]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path!r} holds no state_dict of tensors (found {type(obj).__name__})")
    return obj


def dit_config_from_state_dict(state: dict[str, torch.Tensor]) -> dict:
    """DiT constructor arguments inferred from the tensor shapes of an official-layout
    state_dict."""
    missing = [k for k in _REQUIRED if k not in state]
    if missing:
        raise ValueError(
            f"not a DiT checkpoint in the official layout: missing {missing}; "
            f"expected keys such as {', '.join(_REQUIRED)}"
        )
    hidden, in_channels, patch, _ = state["x_embedder.proj.weight"].shape
    grid = math.isqrt(state["pos_embed"].shape[1])
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    table_rows = state["y_embedder.embedding_table.weight"].shape[0]
    out_channels = state["final_layer.linear.weight"].shape[0] // (patch * patch)
    return dict(
        input_size=grid * patch,
        patch_size=patch,
        in_channels=in_channels,
        hidden_size=hidden,
        depth=depth,
        num_heads=_HEADS_BY_WIDTH.get(hidden),
        mlp_ratio=state["blocks.0.mlp.fc1.weight"].shape[0] / hidden,
        num_classes=table_rows - 1,  # the last row is the null class
        learn_sigma=out_channels == 2 * in_channels,
    )


def load_official_dit(path: str | os.PathLike, **overrides) -> DiT:
    """A released DiT checkpoint (or any file in that layout) -> DiT in eval mode, weights loaded
    strictly. Input size and variant are inferred from the tensors; `overrides` (e.g. num_heads for
    a custom width, rope) are passed to the constructor."""
    path = os.fspath(path)
    state = read_state_dict(path)
    config = {**dit_config_from_state_dict(state), **overrides}
    if config["num_heads"] is None:
        raise ValueError(
            f"{path!r}: width {config['hidden_size']} is not a published variant; pass num_heads="
        )
    model = DiT(**config)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(
            f"{path!r} does not match the DiT layout inferred from it ({config}): {err}"
        ) from err
    return model.eval()


def export_weights(state: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Write a state_dict as safetensors (e.g. the EMA weights of a training checkpoint),
    atomically."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, os.fspath(tmp))
