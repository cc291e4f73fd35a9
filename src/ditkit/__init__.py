"""ditkit: train Diffusion Transformers with Lightning + Hydra."""

__version__ = "0.1.0"
