"""Training objectives and their samplers: Gaussian diffusion (DDPM/DDIM, as DiT), rectified flow
(SD3 / SiT style) and MeanFlow (one step), with classifier-free guidance for every sampler. The
contract an objective meets is `Objective` (protocol.py); samplers live in one registry
(samplers.py)."""

from .alignment import IREPA, REPA
from .flow import RectifiedFlow
from .gaussian import GaussianDiffusion
from .guidance import Guidance
from .meanflow import MeanFlow
from .protocol import DiffusionObjective, Objective, check_objective
from .reg import REG
from .samplers import SAMPLERS, get_sampler, register_sampler, samplers_of
from .terms import LinearProbe, Term, TermInputs

# isort: off
# The diffusers solvers register after the objectives' own samplers (the registry's order is the
# order errors and `benchmarks/sample.py samplers=all` list them in).
from . import solvers  # noqa: F401
# isort: on

__all__ = [
    "SAMPLERS",
    "DiffusionObjective",
    "GaussianDiffusion",
    "IREPA",
    "REPA",
    "REG",
    "LinearProbe",
    "Guidance",
    "MeanFlow",
    "Objective",
    "RectifiedFlow",
    "Term",
    "TermInputs",
    "check_objective",
    "get_sampler",
    "register_sampler",
    "samplers_of",
]
