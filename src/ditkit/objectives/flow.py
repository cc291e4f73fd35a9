"""Rectified flow (Liu et al. 2023; Esser et al. 2024, SD3; Ma et al. 2024, SiT).

Time convention: t in [0, 1] with t = 1 pure noise:  x_t = (1 - t) x_0 + t eps.  The model
predicts the velocity dx_t/dt = eps - x_0 and sees t * time_scale (default 1000, so DiT's
timestep embedding covers the same range as under DDPM). Sampling integrates from t = 1 to
t = 0 on a (possibly shifted) grid.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .flow_spaces import check_space, convert
from .guidance import Guidance, Model
from .protocol import DiffusionObjective, model_inputs
from .samplers import register_sampler
from .schedule import mean_flat
from .terms import Term, TermInputs

TIME_SAMPLINGS = ("uniform", "logit_normal", "mode")


def shift_time(t, shift: float):
    """SD3 eq. 23: t' = shift * t / (1 + (shift - 1) * t); maps [0, 1] onto itself, and
    shift > 1 spends more time at high noise (needed at high resolution, SD3 sec. 5.3.2)."""
    return shift * t / (1 + (shift - 1) * t)


def mode_time(u: torch.Tensor, scale: float) -> torch.Tensor:
    """SD3 eq. 20, 'mode' sampling: f(u) = 1 - u - scale * (cos^2(pi/2 u) - 1 + u), u ~ U(0, 1)."""
    return 1 - u - scale * (torch.cos(math.pi / 2 * u) ** 2 - 1 + u)


class RectifiedFlow(DiffusionObjective):
    """Rectified-flow objective.

    time_sampling: training t ~ "uniform" U(0, 1), "logit_normal" sigmoid(N(logit_mean,
    logit_std^2)) (SD3's default 0, 1), or "mode" (SD3 eq. 20, heavier middle for
    mode_scale > 0). shift: time shift of SD3 eq. 23 (1 = none); with shift_reference_area
    set, the shift is resolution-dependent: shift * sqrt(H * W / shift_reference_area) for a
    latent of H x W (SD3 sec. 5.3.2: shift by sqrt(m / n) from the resolution tuned at).
    shift_training: also shift the training t draws (SD3) rather than only the sampling grid.
    cosine_loss_weight: weight of 1 - cos(v_pred, v) over channels (LightningDiT).
    time_scale: the model sees t * time_scale.
    prediction: what the network outputs, "v" (velocity), "x" (clean data; JiT) or "eps" (noise);
    loss_space: where the squared error is taken, any of the same three (flow_spaces.py). JiT
    (arXiv 2511.13720, LTH14/JiT denoiser.py) is prediction=x, loss_space=v. t_eps: the divisions
    by t (from x) and by 1 - t (from eps) use max(., t_eps), in the loss and when sampling, as
    the reference does (JiT: 0.05). noise_scale: x_t = (1 - t) x_0 + t * noise_scale * eps, and
    sampling starts from noise_scale * x_T (JiT: 1 at 256 px, 2 at 512 px).
    A model with 2C output channels (learn_sigma) has its first C read as the prediction.
    terms: extra losses with their own parameters ({name: Term}, see terms.py).
    """

    name = "flow"
    default_sampler = "euler"

    def __init__(
        self,
        time_sampling: str = "logit_normal",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        mode_scale: float = 1.29,
        shift: float = 1.0,
        shift_reference_area: int | None = None,
        shift_training: bool = True,
        cosine_loss_weight: float = 0.0,
        time_scale: float = 1000.0,
        prediction: str = "v",
        loss_space: str = "v",
        t_eps: float = 0.05,
        noise_scale: float = 1.0,
        terms: Mapping[str, Term] | None = None,
    ):
        super().__init__(terms)
        check_space("prediction", prediction)
        check_space("loss_space", loss_space)
        if not 0.0 <= t_eps < 0.5:
            raise ValueError(f"t_eps must lie in [0, 0.5), got {t_eps}")
        if noise_scale <= 0:
            raise ValueError(f"noise_scale must be > 0, got {noise_scale}")
        if cosine_loss_weight > 0 and loss_space != "v":
            raise ValueError(
                "cosine_loss_weight is a velocity-direction loss: use it with loss_space=v"
            )
        if time_sampling not in TIME_SAMPLINGS:
            raise ValueError(
                f"unknown time_sampling {time_sampling!r}; choose one of {', '.join(TIME_SAMPLINGS)}"
            )
        if logit_std <= 0:
            raise ValueError(f"logit_std must be > 0, got {logit_std}")
        # f(u) is monotone (a valid inverse CDF) only for -1 <= scale <= 2 / (pi - 2).
        if not -1.0 <= mode_scale <= 2 / (math.pi - 2):
            raise ValueError(
                f"mode_scale must lie in [-1, {2 / (math.pi - 2):.3f}], got {mode_scale}"
            )
        if shift <= 0:
            raise ValueError(f"shift must be > 0, got {shift}")
        if shift_reference_area is not None and shift_reference_area <= 0:
            raise ValueError(
                f"shift_reference_area must be a positive H*W, got {shift_reference_area}"
            )
        if cosine_loss_weight < 0:
            raise ValueError(f"cosine_loss_weight must be >= 0, got {cosine_loss_weight}")
        self.time_sampling = time_sampling
        self.logit_mean, self.logit_std, self.mode_scale = (
            float(logit_mean),
            float(logit_std),
            float(mode_scale),
        )
        self.shift, self.shift_reference_area = float(shift), shift_reference_area
        self.shift_training = bool(shift_training)
        self.cosine_loss_weight = float(cosine_loss_weight)
        self.time_scale = float(time_scale)
        self.prediction, self.loss_space = prediction, loss_space
        self.t_eps, self.noise_scale = float(t_eps), float(noise_scale)

    def check_joint_tokens(self, key: str, term: Term) -> None:
        """REG's token is a velocity-predicted rectified flow of unit noise (its reference)."""
        if self.prediction != "v" or self.noise_scale != 1.0:
            raise ValueError(
                f"objective term {key!r} ({type(term).__name__}) predicts its tokens' velocity "
                f"from unit noise: use objective.prediction=v and objective.noise_scale=1 (got "
                f"{self.prediction}, {self.noise_scale})"
            )

    def convert(self, pred, x_t, t, source: str, target: str) -> torch.Tensor:
        """`pred` in space `source` -> `target` at (x_t, t), with this objective's noise scale and
        clipping (flow_spaces.convert)."""
        return convert(pred, x_t, t, source, target, self.noise_scale, self.t_eps)

    def effective_shift(self, height: int, width: int) -> float:
        """The shift used for an H x W latent."""
        if self.shift_reference_area is None:
            return self.shift
        return self.shift * math.sqrt(height * width / self.shift_reference_area)

    def sample_t(
        self, n: int, device=None, height: int | None = None, width: int | None = None
    ) -> torch.Tensor:
        """(n,) training times from the global RNG, shifted for an H x W latent when asked."""
        if self.time_sampling == "uniform":
            t = torch.rand(n, device=device)
        elif self.time_sampling == "logit_normal":
            t = torch.sigmoid(self.logit_mean + self.logit_std * torch.randn(n, device=device))
        else:
            t = mode_time(torch.rand(n, device=device), self.mode_scale)
        if self.shift_training and height is not None:
            t = shift_time(t, self.effective_shift(height, width))
        return t

    def interpolate(
        self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor
    ) -> torch.Tensor:
        """x_t = (1 - t) x_0 + t * noise_scale * eps. x_start, noise (eps): (N, C, H, W); t: (N,)."""
        t = t.view(-1, *([1] * (x_start.ndim - 1)))
        return (1 - t) * x_start + t * self.noise_scale * noise

    def velocity(
        self, model: Model, x: torch.Tensor, t: torch.Tensor, model_kwargs=None
    ) -> torch.Tensor:
        """The model's velocity (N, C, H, W) at x: (N, C, H, W), t: (N,) in [0, 1]."""
        out = self._velocity_channels(model(x, t * self.time_scale, **(model_kwargs or {})), x)
        return self.convert(out, x, t, self.prediction, "v")

    @staticmethod
    def _velocity_channels(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        if out.shape[1] not in (c, 2 * c):
            raise ValueError(
                f"the model gave {out.shape[1]} channels for {c}-channel input; expected {c} or {2 * c}"
            )
        return out[:, :c].to(x.dtype)

    def training_losses(self, model: Model, batch: Mapping, t=None, noise=None) -> dict:
        """Per-sample losses (N,): `loss`, `mse`, `cos` when cosine_loss_weight > 0, one per term.

        batch: {"x": (N, C, H, W) x_0, and the model's condition fields}; t: (N,) in [0, 1],
        drawn when None; noise (unit eps) drawn when None (t first, then noise, from the global
        RNG). The error is taken in `loss_space` between the prediction and the truth in the
        prediction's space, both converted by the same (clipped) map: for JiT, v_pred = (x_t -
        x_pred) / max(t, t_eps) against v = (x_t - x_0) / max(t, t_eps) (LTH14/JiT denoiser.py)."""
        x_start, condition = model_inputs(model, batch)
        n, _, h, w = x_start.shape
        if t is None:
            t = self.sample_t(n, x_start.device, h, w)
        if noise is None:
            noise = torch.randn_like(x_start)
        x_t = self.interpolate(x_start, t, noise)
        joint, pair = self.joint_term(), None
        if joint is None:
            output, hidden = self.forward_model(model, x_t, t * self.time_scale, condition)
        else:
            # REG (loss.py SILoss.__call__): the clean tokens z get the image's t and their own
            # noise (drawn after the image's), z_t = (1 - t) z + t eps_z; target eps_z - z.
            tokens = joint[1].joint_tokens(batch).to(x_start.dtype)
            token_noise = torch.randn_like(tokens)
            output, velocity, hidden = joint[1].joint_forward(
                model,
                x_t,
                t * self.time_scale,
                condition,
                self.interpolate(tokens, t, token_noise),
                self.term_depths(),
            )
            pair = (
                velocity.to(torch.promote_types(velocity.dtype, torch.float32)),
                token_noise - tokens,
            )
        output = output.float()
        pred = self._velocity_channels(output, x_t)
        truth = {"v": self.noise_scale * noise - x_start, "x": x_start, "eps": noise}
        target = self.convert(truth[self.prediction], x_t, t, self.prediction, self.loss_space)
        pred = self.convert(pred, x_t, t, self.prediction, self.loss_space)
        terms = {"mse": mean_flat((pred - target) ** 2)}
        terms["loss"] = terms["mse"]
        if self.cosine_loss_weight > 0:
            terms["cos"] = mean_flat(1 - F.cosine_similarity(pred, target, dim=1))
            terms["loss"] = terms["mse"] + self.cosine_loss_weight * terms["cos"]
        return self.add_terms(terms, TermInputs(model, batch, x_t, t, output, hidden, pair))

    def time_grid(self, steps: int, height: int, width: int) -> list[float]:
        """steps + 1 times from 1 to 0, evenly spaced then shifted for an H x W latent."""
        if int(steps) < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        shift = self.effective_shift(height, width)
        return [shift_time(1 - i / steps, shift) for i in range(int(steps) + 1)]

    def guided_velocity(
        self, model: Model, x: torch.Tensor, t: float, model_kwargs: dict | None, guidance: Guidance
    ) -> torch.Tensor:
        """The (guided) velocity (N, C, H, W) at x: (N, C, H, W) and flow time t (a number)."""
        t_model = torch.full((x.shape[0],), t * self.time_scale, device=x.device)
        out = self._velocity_channels(guidance(model, x, t_model, model_kwargs, t, x.shape[1]), x)
        return self.convert(out, x, t, self.prediction, "v")

    def sample(self, model: Model, x_T: torch.Tensor, model_kwargs=None, **kw) -> torch.Tensor:
        """x_0 from unit noise x_T: (N, C, H, W), scaled by noise_scale first (see
        DiffusionObjective.sample for the options)."""
        return super().sample(model, self.noise_scale * x_T, model_kwargs, **kw)


# ---------------------------------------------------------------------- registered samplers
def _grid(objective: RectifiedFlow, x_T: torch.Tensor, steps: int, progress: bool, name: str):
    """(t, t_next, last) over the shifted grid from 1 to 0, with a progress bar."""
    grid = objective.time_grid(steps, x_T.shape[-2], x_T.shape[-1])
    for i in tqdm(range(len(grid) - 1), disable=not progress, desc=name):
        yield grid[i], grid[i + 1], i == len(grid) - 2


@register_sampler(
    "euler", "flow", default_steps=50, description="Euler on the probability-flow ODE"
)
def euler_sampler(objective, model, x_T, model_kwargs, *, steps, guidance, progress):
    x = x_T
    for t, t_next, _ in _grid(objective, x_T, steps, progress, "euler"):
        x = x + (t_next - t) * objective.guided_velocity(model, x, t, model_kwargs, guidance)
    return x


@register_sampler(
    "heun",
    "flow",
    default_steps=25,
    nfe_per_step=2,
    description="Heun (2nd order) on the probability-flow ODE",
)
def heun_sampler(objective, model, x_T, model_kwargs, *, steps, guidance, progress):
    x = x_T
    for t, t_next, last in _grid(objective, x_T, steps, progress, "heun"):
        dt = t_next - t  # negative: integrating from noise to data
        v = objective.guided_velocity(model, x, t, model_kwargs, guidance)
        if last and objective.prediction == "x":
            # x-prediction's velocity (x_t - x) / t is 0 / 0 at t = 0: the last step is Euler, as
            # in JiT (LTH14/JiT denoiser.py, generate: "last step euler").
            x = x + dt * v
            break
        # Heun's method (trapezoidal predictor-corrector), 2nd order (Karras et al. 2022, alg. 1).
        v_next = objective.guided_velocity(model, x + dt * v, t_next, model_kwargs, guidance)
        x = x + dt * 0.5 * (v + v_next)
    return x


@register_sampler(
    "sde",
    "flow",
    default_steps=250,
    diffusion_norm=1.0,
    description="Euler-Maruyama on the SDE with the ODE's marginals (SiT's FID protocol: 250)",
)
def sde_sampler(
    objective, model, x_T, model_kwargs, *, steps, guidance, progress, diffusion_norm=1.0
):
    """diffusion_norm: the SDE's diffusion g(t)^2 = diffusion_norm * t."""
    if diffusion_norm < 0:
        raise ValueError(f"diffusion_norm must be >= 0, got {diffusion_norm}")
    x = x_T
    for t, t_next, last in _grid(objective, x_T, steps, progress, "sde"):
        v = objective.guided_velocity(model, x, t, model_kwargs, guidance)
        x = sde_step(x, v, t, t_next - t, diffusion_norm, last, objective.noise_scale)
    return x


def sde_step(x, v, t: float, dt: float, norm: float, last: bool, noise_scale: float = 1.0):
    """One reverse-time Euler-Maruyama step of dx = [v - g^2/2 * score] dt + g dW.

    For x_t = (1 - t) x_0 + t eps the score is -E[eps | x_t] / t and E[eps | x_t] =
    x_t + (1 - t) v, so with g^2 = norm * t (SiT's 'sigma' diffusion) the drift
    v + norm/2 * (x + (1 - t) v) stays finite as t -> 0. Every such SDE has the ODE's
    marginals (Song et al. 2021, eq. 13). The last step takes the mean (no noise). With noise
    n = noise_scale * eps the score is -E[n | x_t] / (t noise_scale^2), hence the 1 / scale^2.
    """
    drift = v + 0.5 * norm / noise_scale**2 * (x + (1 - t) * v)
    x = x + dt * drift
    if not last and norm > 0:
        x = x + math.sqrt(norm * t * -dt) * torch.randn_like(x)
    return x
