"""Backbones. A model maps (x_t, t, condition) to an output of the latent's layout; it knows nothing of diffusion."""

from .dit import DIT_VARIANTS, DiT, build_dit
from .mmdit import MMDiT
from .unet import UNet

__all__ = ["DiT", "DIT_VARIANTS", "MMDiT", "UNet", "build_dit"]
