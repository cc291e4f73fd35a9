"""Backbones. A model maps (x_t, t, condition) to an output of the latent's layout; it knows nothing of diffusion."""

from .dit import DIT_VARIANTS, DiT, build_dit
from .mmdit import MMDiT

__all__ = ["DiT", "DIT_VARIANTS", "MMDiT", "UNet", "build_dit"]


def __getattr__(name: str):
    # The U-Net baseline wraps diffusers' blocks; importing diffusers costs seconds, so only on first use.
    if name == "UNet":
        from .unet import UNet

        return UNet
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
