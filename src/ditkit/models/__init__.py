"""Backbones. A model maps (x_t, t, condition) to an output of the latent's layout; it knows nothing of diffusion."""

from .dit import DIT_VARIANTS, DiT, build_dit

__all__ = ["DiT", "DIT_VARIANTS", "build_dit"]
