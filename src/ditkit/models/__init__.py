"""Backbones. A model maps (x_t, t, condition) to an output of the latent's layout; it knows nothing
of diffusion. The contract every backbone meets is `Backbone` (protocol.py, docs/extending.md)."""

from .dit import DIT_VARIANTS, DiT, build_dit
from .encoders import ENCODERS, FrozenEncoder
from .jit import JIT_VARIANTS, JiT, build_jit
from .mmdit import MMDiT
from .protocol import Backbone, check_backbone

__all__ = [
    "DIT_VARIANTS",
    "ENCODERS",
    "JIT_VARIANTS",
    "Backbone",
    "DiT",
    "FrozenEncoder",
    "JiT",
    "MMDiT",
    "UNet",
    "build_dit",
    "build_jit",
    "check_backbone",
]


def __getattr__(name: str):
    # The U-Net baseline wraps diffusers' blocks; importing diffusers costs seconds: first use only.
    if name == "UNet":
        from .unet import UNet

        return UNet
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
