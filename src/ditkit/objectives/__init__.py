"""Training objectives and their samplers: Gaussian diffusion (DDPM/DDIM, as DiT) and
rectified flow (SD3 / SiT style), with classifier-free guidance for every sampler."""

from .flow import RectifiedFlow
from .gaussian import GaussianDiffusion
from .guidance import Guidance

__all__ = ["GaussianDiffusion", "RectifiedFlow", "Guidance"]
