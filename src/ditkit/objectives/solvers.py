"""Few-step ODE solvers from diffusers, as registered samplers: no hand-written solver math.

- `dpmpp_2m` (ddpm): DPM-Solver++(2M), Lu et al. 2022b ("DPM-Solver++", Alg. 2, multistep
  second order in data prediction), through `diffusers.DPMSolverMultistepScheduler`.
- `unipc` (ddpm): UniPC, Zhao et al. 2023 (UniP predictor + UniC corrector, B2(h) = e^h - 1,
  "bh2"), through `diffusers.UniPCMultistepScheduler`.
- `unipc_flow` (flow): the same UniPC on the rectified-flow ODE (diffusers' flow sigmas with
  `prediction_type="flow_prediction"`, as Wan 2.1 samples), on ditkit's own shifted time grid.

Each scheduler is configured to the objective it integrates: the DDPM ones take the objective's
training betas (`trained_betas`, so any schedule ditkit trains with) and its prediction type, and
read only the first C (eps / x0 / v) channels: a learned variance is not needed by an ODE solver.
(diffusers' own `variance_type="learned"` would keep the first 3 channels, wrong for 4-channel
latents, so it is not used.) Guidance goes through the objective's one `Guidance`, so the guided
halves are one batch of 2N, guidance_interval and guidance_channels work as for every sampler.
diffusers is imported when a solver first runs.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .samplers import register_sampler
from .schedule import beta_schedule

# ditkit's GaussianDiffusion.prediction -> diffusers' prediction_type
PREDICTION_TYPES = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}


def _count(steps: Any, name: str) -> int:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(
            f"sampler={name} takes an integer number of steps >= 1 (sampler.steps=20), got {steps!r}"
        )
    return steps


def ddpm_scheduler(objective, name: str, steps: int, order: int = 2):
    """The diffusers scheduler `name` ("dpmpp_2m" | "unipc") set to the training schedule of the
    GaussianDiffusion `objective` (its T betas, its prediction) with `steps` timesteps set (diffusers'
    default "linspace" spacing over [0, T - 1], final sigma 0, lower-order final steps)."""
    from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler

    betas = beta_schedule(objective.schedule, objective.original_num_timesteps)
    common = dict(
        num_train_timesteps=objective.original_num_timesteps,
        trained_betas=betas.numpy(),
        prediction_type=PREDICTION_TYPES[objective.prediction],
        solver_order=order,
        final_sigmas_type="zero",
    )
    if name == "dpmpp_2m":
        scheduler = DPMSolverMultistepScheduler(
            algorithm_type="dpmsolver++", solver_type="midpoint", **common
        )
    elif name == "unipc":
        scheduler = UniPCMultistepScheduler(predict_x0=True, solver_type="bh2", **common)
    else:
        raise ValueError(f"no diffusers scheduler for {name!r}; choose dpmpp_2m or unipc")
    scheduler.set_timesteps(_count(steps, name))
    return scheduler


def flow_scheduler(grid: list[float], order: int = 2):
    """diffusers' UniPC on the rectified-flow ODE, stepping on `grid`, the objective's own (shifted,
    resolution-aware) times from 1 to 0 (`RectifiedFlow.time_grid`): sigmas = t (diffusers moves
    the first from 1 to 1 - 1e-6 to keep log(alpha) finite)."""
    from diffusers import UniPCMultistepScheduler

    scheduler = UniPCMultistepScheduler(
        use_flow_sigmas=True,
        prediction_type="flow_prediction",
        flow_shift=1.0,  # the grid is shifted already
        solver_order=order,
        predict_x0=True,
        solver_type="bh2",
        final_sigmas_type="zero",
    )
    scheduler.set_timesteps(sigmas=np.array(grid[:-1]))
    return scheduler


def _check_order(order: int, name: str) -> int:
    if order not in (1, 2, 3):
        raise ValueError(f"sampler={name} order must be 1, 2 or 3, got {order!r}")
    return order


def _ddpm_solve(model, x_T, model_kwargs, scheduler, guidance, progress, name):
    x, c = x_T, x_T.shape[1]
    for t in tqdm(scheduler.timesteps, disable=not progress, desc=name):
        time = float(t)  # an original timestep, what DiT sees and guidance_interval is in
        t_model = torch.full((x.shape[0],), time, device=x.device)
        out = guidance(model, x, t_model, model_kwargs, time, c)
        x = scheduler.step(out[:, :c].to(x.dtype), t, x).prev_sample
    return x


@register_sampler(
    "dpmpp_2m",
    "ddpm",
    default_steps=20,
    description="DPM-Solver++(2M) (Lu et al. 2022b), diffusers' DPMSolverMultistepScheduler",
)
def dpmpp_2m_sampler(objective, model, x_T, model_kwargs, *, steps, guidance, progress):
    scheduler = ddpm_scheduler(objective, "dpmpp_2m", steps)
    return _ddpm_solve(model, x_T, model_kwargs, scheduler, guidance, progress, "dpmpp_2m")


@register_sampler(
    "unipc",
    "ddpm",
    default_steps=20,
    order=2,
    description="UniPC-bh2 (Zhao et al. 2023), diffusers' UniPCMultistepScheduler",
)
def unipc_sampler(objective, model, x_T, model_kwargs, *, steps, guidance, progress, order=2):
    scheduler = ddpm_scheduler(objective, "unipc", steps, _check_order(order, "unipc"))
    return _ddpm_solve(model, x_T, model_kwargs, scheduler, guidance, progress, "unipc")


@register_sampler(
    "unipc_flow",
    "flow",
    default_steps=20,
    order=2,
    description="UniPC-bh2 on the flow ODE, diffusers' UniPCMultistepScheduler (flow sigmas)",
)
def unipc_flow_sampler(objective, model, x_T, model_kwargs, *, steps, guidance, progress, order=2):
    _check_order(order, "unipc_flow")
    grid = objective.time_grid(_count(steps, "unipc_flow"), x_T.shape[-2], x_T.shape[-1])
    scheduler = flow_scheduler(grid, order)
    x = x_T
    for i, t in enumerate(tqdm(scheduler.timesteps, disable=not progress, desc="unipc_flow")):
        # The model sees the grid's time (t = 1 at the start, as Euler and Heun give it).
        v = objective.guided_velocity(model, x, grid[i], model_kwargs, guidance)
        x = scheduler.step(v, t, x).prev_sample
    return x
