"""Gaussian diffusion as trained and sampled by DiT (Peebles & Xie 2023): DDPM (Ho et al. 2020)
with the learned-variance hybrid loss and timestep respacing of improved DDPM (Nichol &
Dhariwal 2021), and DDIM sampling (Song et al. 2021).

Time convention: t is an integer step index of this process (0 = least noise). A respaced
process keeps the original step of each index in `timestep_map`; the model always sees the
ORIGINAL timestep (as a float in [0, 1000)), whatever the respacing.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping

import torch
from tqdm.auto import tqdm

from .guidance import Guidance, Model
from .protocol import DiffusionObjective, model_inputs
from .samplers import register_sampler
from .schedule import (
    SCHEDULES,
    beta_schedule,
    discretized_gaussian_log_likelihood,
    mean_flat,
    normal_kl,
    respaced_betas,
    space_timesteps,
)
from .terms import Term, TermInputs

PREDICTIONS = ("eps", "x0", "v")


class GaussianDiffusion(DiffusionObjective):
    """DDPM objective.

    num_timesteps: T of the training process. schedule: "linear" | "cosine" betas.
    learn_sigma: the model outputs 2C channels, the second C interpolating the log-variance
    between the posterior variance and beta (improved DDPM, eq. 15), trained by the VLB.
    prediction: what the first C output channels predict: "eps" (noise), "x0", or "v"
    (v = sqrt(abar) eps - sqrt(1 - abar) x0, Salimans & Ho 2022).
    fixed_variance: sampling variance when learn_sigma is False: "large" (beta_t, DiT's
    default) or "small" (the posterior variance).
    terms: extra losses with their own parameters ({name: Term}, see terms.py).
    """

    name = "ddpm"
    default_sampler = "ddpm"

    def __init__(
        self,
        num_timesteps: int = 1000,
        schedule: str = "linear",
        learn_sigma: bool = True,
        prediction: str = "eps",
        fixed_variance: str = "large",
        terms: Mapping[str, Term] | None = None,
    ):
        super().__init__(terms)
        if schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
        if prediction not in PREDICTIONS:
            raise ValueError(
                f"unknown prediction {prediction!r}; choose one of {', '.join(PREDICTIONS)}"
            )
        if fixed_variance not in ("large", "small"):
            raise ValueError(f"fixed_variance must be 'large' or 'small', got {fixed_variance!r}")
        self.schedule = schedule
        self.learn_sigma = bool(learn_sigma)
        self.prediction = prediction
        self.fixed_variance = fixed_variance
        self.original_num_timesteps = int(num_timesteps)
        self._respaced: dict[str, GaussianDiffusion] = {}
        self._set_betas(beta_schedule(schedule, num_timesteps), list(range(num_timesteps)))

    def _set_betas(self, betas: torch.Tensor, timestep_map: list[int]) -> None:
        """Derive every per-step coefficient (float64) from betas: (T,)."""
        self.num_timesteps = len(betas)
        self.timestep_map = timestep_map
        self.betas = betas
        abar = torch.cumprod(1.0 - betas, dim=0)
        abar_prev = torch.cat([abar.new_ones(1), abar[:-1]])
        self.alphas_cumprod, self.alphas_cumprod_prev = abar, abar_prev
        # Posterior q(x_{t-1} | x_t, x_0) (Ho et al. 2020, eqs. 6-7).
        post_var = betas * (1.0 - abar_prev) / (1.0 - abar)
        # The posterior variance is 0 at t=0: the log is clipped to its t=1 value.
        post_log_var = (
            torch.log(torch.cat([post_var[1:2], post_var[1:]]))
            if len(betas) > 1
            else post_var.log()
        )
        if self.fixed_variance == "large":
            # Ho et al. 2020 sec. 3.2: sigma^2 = beta_t, with the t=0 entry swapped for the
            # posterior variance so the decoder's variance stays small.
            fixed_var = torch.cat([post_var[1:2], betas[1:]])
        else:
            fixed_var = post_var
        self._coef = {
            "sqrt_abar": abar.sqrt(),
            "sqrt_one_minus_abar": (1.0 - abar).sqrt(),
            "sqrt_recip_abar": (1.0 / abar).sqrt(),
            "sqrt_recipm1_abar": (1.0 / abar - 1.0).sqrt(),
            "abar": abar,
            "abar_prev": abar_prev,
            "post_mean_coef1": betas * abar_prev.sqrt() / (1.0 - abar),
            "post_mean_coef2": (1.0 - abar_prev) * (1.0 - betas).sqrt() / (1.0 - abar),
            "post_var": post_var,
            "post_log_var": post_log_var,
            "log_betas": betas.log(),
            "fixed_var": fixed_var,
            "fixed_log_var": fixed_var.log() if self.fixed_variance == "large" else post_log_var,
            "timestep_map": torch.tensor(timestep_map, dtype=torch.float64),
        }
        self._device_coef: dict[torch.device, dict[str, torch.Tensor]] = {}

    def _c(self, name: str, t: torch.Tensor, ndim: int = 4) -> torch.Tensor:
        """Coefficient `name` at steps t: (N,) -> (N, 1, ..., 1) float32 on t's device."""
        table = self._device_coef.get(t.device)
        if table is None:
            table = {k: v.to(device=t.device, dtype=torch.float32) for k, v in self._coef.items()}
            self._device_coef[t.device] = table
        return table[name][t].view(-1, *([1] * (ndim - 1)))

    def respace(self, spec: str | int) -> GaussianDiffusion:
        """The process over the steps kept by `spec` ("250", "ddim50", "10,10,5"); see
        `schedule.space_timesteps`. Its model calls still receive the original timesteps."""
        key = str(spec)
        if key not in self._respaced:
            kept = space_timesteps(self.original_num_timesteps, key)
            base_betas = beta_schedule(self.schedule, self.original_num_timesteps)
            spaced = copy.copy(self)
            spaced._respaced = {}
            spaced._set_betas(respaced_betas(torch.cumprod(1.0 - base_betas, 0), kept), kept)
            self._respaced[key] = spaced
        return self._respaced[key]

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """(N,) step indices of this process -> (N,) float original timesteps for the model."""
        return self._c("timestep_map", t, ndim=1)

    # ------------------------------------------------------------------ forward process
    def q_sample(
        self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x_t ~ q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I). x_start: (N, C, H, W), t:
        (N,)."""
        if noise is None:
            noise = torch.randn_like(x_start)
        nd = x_start.ndim
        return self._c("sqrt_abar", t, nd) * x_start + self._c("sqrt_one_minus_abar", t, nd) * noise

    def q_posterior_mean_variance(self, x_start, x_t, t):
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0); (N, C, H, W) each."""
        nd = x_t.ndim
        mean = self._c("post_mean_coef1", t, nd) * x_start + self._c("post_mean_coef2", t, nd) * x_t
        return mean, self._c("post_var", t, nd), self._c("post_log_var", t, nd)

    def _predict_xstart(self, x_t, t, pred):
        nd = x_t.ndim
        if self.prediction == "eps":
            return (
                self._c("sqrt_recip_abar", t, nd) * x_t - self._c("sqrt_recipm1_abar", t, nd) * pred
            )
        if self.prediction == "x0":
            return pred
        return self._c("sqrt_abar", t, nd) * x_t - self._c("sqrt_one_minus_abar", t, nd) * pred

    def _predict_eps_from_xstart(self, x_t, t, x_start):
        nd = x_t.ndim
        return (self._c("sqrt_recip_abar", t, nd) * x_t - x_start) / self._c(
            "sqrt_recipm1_abar", t, nd
        )

    # ------------------------------------------------------------------ reverse process
    def p_mean_variance_from_output(self, output, x, t, clip_denoised=False) -> dict:
        """p(x_{t-1} | x_t) from a model output (N, C or 2C, H, W) at x: (N, C, H, W), t: (N,)."""
        c = x.shape[1]
        nd = x.ndim
        output = output.float()
        if self.learn_sigma:
            if output.shape[1] != 2 * c:
                raise ValueError(
                    f"learn_sigma expects {2 * c} output channels, the model gave {output.shape[1]}"
                )
            output, var_values = output[:, :c], output[:, c:]
            # improved DDPM eq. 15: v in [-1, 1] interpolates log beta_tilde .. log beta.
            frac = (var_values + 1) / 2
            log_var = frac * self._c("log_betas", t, nd) + (1 - frac) * self._c(
                "post_log_var", t, nd
            )
            var = torch.exp(log_var)
        else:
            if output.shape[1] != c:
                raise ValueError(
                    f"expected {c} output channels (learn_sigma=False), the model gave {output.shape[1]}"
                )
            var = self._c("fixed_var", t, nd).expand_as(x)
            log_var = self._c("fixed_log_var", t, nd).expand_as(x)
        pred_xstart = self._predict_xstart(x, t, output)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1, 1)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)
        return {"mean": mean, "variance": var, "log_variance": log_var, "pred_xstart": pred_xstart}

    def p_mean_variance(self, model: Model, x, t, model_kwargs=None, clip_denoised=False) -> dict:
        """dict(mean, variance, log_variance, pred_xstart), each (N, C, H, W); t: (N,) indexes
        this (possibly respaced) process."""
        output = model(x, self.model_timesteps(t), **(model_kwargs or {}))
        return self.p_mean_variance_from_output(output, x, t, clip_denoised)

    # ------------------------------------------------------------------ training
    def training_losses(self, model: Model, batch: Mapping, t=None, noise=None) -> dict:
        """Per-sample losses (N,): `loss`, `mse`, `vb` when learn_sigma, and one per term.

        batch: {"x": (N, C, H, W) x_0, and the model's condition fields}. t: (N,) step indices,
        drawn uniformly when None; noise drawn when None (both from the global RNG, in that order,
        as the reference training loop). With learn_sigma the VLB term sees the mean prediction
        detached, so it trains only the variance (improved DDPM, sec. 3.1, L_hybrid = L_simple +
        L_vlb).
        """
        x_start, condition = model_inputs(model, batch)
        n = x_start.shape[0]
        if t is None:
            t = torch.randint(0, self.num_timesteps, (n,), device=x_start.device)
        if noise is None:
            noise = torch.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise)
        output, hidden = self.forward_model(model, x_t, self.model_timesteps(t), condition)
        output = output.float()
        full_output = output
        c = x_start.shape[1]
        terms = {}
        if self.learn_sigma:
            frozen = torch.cat([output[:, :c].detach(), output[:, c:]], dim=1)
            terms["vb"] = self._vb_bits_per_dim(frozen, x_start, x_t, t)
            output = output[:, :c]
        if self.prediction == "eps":
            target = noise
        elif self.prediction == "x0":
            target = x_start
        else:
            nd = x_start.ndim
            target = (
                self._c("sqrt_abar", t, nd) * noise
                - self._c("sqrt_one_minus_abar", t, nd) * x_start
            )
        terms["mse"] = mean_flat((target - output) ** 2)
        terms["loss"] = terms["mse"] + terms["vb"] if "vb" in terms else terms["mse"]
        return self.add_terms(terms, TermInputs(model, batch, x_t, t, full_output, hidden))

    def _vb_bits_per_dim(self, output, x_start, x_t, t) -> torch.Tensor:
        """The VLB term L_t in bits/dim, (N,): KL to the true posterior for t > 0, the
        discretised decoder NLL for t = 0 (Ho et al. 2020, eq. 5)."""
        true_mean, _, true_log_var = self.q_posterior_mean_variance(x_start, x_t, t)
        out = self.p_mean_variance_from_output(output, x_t, t)
        kl = mean_flat(
            normal_kl(true_mean, true_log_var, out["mean"], out["log_variance"])
        ) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x_start, out["mean"], 0.5 * out["log_variance"])
        nll = mean_flat(nll) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    # ------------------------------------------------------------------ samplers
    def _step_output(self, model, x, i, model_kwargs, guidance):
        """Model output at step index i of this process for the whole batch x: (N, C, H, W)."""
        t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
        out = guidance(
            model, x, self.model_timesteps(t), model_kwargs, self.timestep_map[i], x.shape[1]
        )
        return t, out

    @torch.no_grad()
    def ddpm_sample(
        self,
        model: Model,
        x_T,
        model_kwargs=None,
        progress=False,
        clip_denoised=False,
        guidance: Guidance | None = None,
    ) -> torch.Tensor:
        """Ancestral sampling x_T -> x_0 over every step of this process. x_T: (N, C, H, W)."""
        guidance = guidance or Guidance()
        x = x_T
        for i in tqdm(range(self.num_timesteps - 1, -1, -1), disable=not progress, desc="ddpm"):
            t, out = self._step_output(model, x, i, model_kwargs, guidance)
            p = self.p_mean_variance_from_output(out, x, t, clip_denoised)
            # One draw per step, the last included (masked), as the reference: unguided, a seed
            # reproduces its samples.
            noise = torch.randn_like(x)
            x = p["mean"] + (torch.exp(0.5 * p["log_variance"]) * noise if i > 0 else 0.0)
        return x

    @torch.no_grad()
    def ddim_sample(
        self,
        model: Model,
        x_T,
        model_kwargs=None,
        eta=0.0,
        progress=False,
        clip_denoised=False,
        guidance: Guidance | None = None,
    ) -> torch.Tensor:
        """DDIM (Song et al. 2021, eq. 12) x_T -> x_0 over every step of this process; eta=0 is
        deterministic, eta=1 matches DDPM's posterior variance. x_T: (N, C, H, W)."""
        guidance = guidance or Guidance()
        x = x_T
        for i in tqdm(range(self.num_timesteps - 1, -1, -1), disable=not progress, desc="ddim"):
            t, out = self._step_output(model, x, i, model_kwargs, guidance)
            x0 = self.p_mean_variance_from_output(out, x, t, clip_denoised)["pred_xstart"]
            eps = self._predict_eps_from_xstart(x, t, x0)
            abar, abar_prev = self._c("abar", t), self._c("abar_prev", t)
            sigma = (
                eta * torch.sqrt((1 - abar_prev) / (1 - abar)) * torch.sqrt(1 - abar / abar_prev)
            )
            x = x0 * torch.sqrt(abar_prev) + torch.sqrt(1 - abar_prev - sigma**2) * eps
            if eta > 0:
                x = x + sigma * torch.randn_like(x)  # sigma is 0 at the last step
        return x


# ---------------------------------------------------------------------- registered samplers
@register_sampler(
    "ddpm",
    "ddpm",
    default_steps=250,
    clip_denoised=False,
    description="ancestral DDPM over evenly respaced steps (DiT's FID protocol: 250)",
)
def ddpm_sampler(
    objective: GaussianDiffusion,
    model,
    x_T,
    model_kwargs,
    *,
    steps,
    guidance,
    progress,
    clip_denoised=False,
) -> torch.Tensor:
    """steps: a count (evenly respaced) or any respacing spec string ("250", "10,10,5")."""
    return objective.respace(str(steps)).ddpm_sample(
        model, x_T, model_kwargs, progress=progress, clip_denoised=clip_denoised, guidance=guidance
    )


@register_sampler(
    "ddim",
    "ddpm",
    default_steps=50,
    eta=0.0,
    clip_denoised=False,
    description="DDIM (Song et al. 2021, eq. 12); eta=0 deterministic, eta=1 DDPM's variance",
)
def ddim_sampler(
    objective: GaussianDiffusion,
    model,
    x_T,
    model_kwargs,
    *,
    steps,
    guidance,
    progress,
    eta=0.0,
    clip_denoised=False,
) -> torch.Tensor:
    """steps: a count (the "ddimN" stride) or any respacing spec string."""
    spec = f"ddim{steps}" if isinstance(steps, int) else steps
    return objective.respace(spec).ddim_sample(
        model,
        x_T,
        model_kwargs,
        eta=eta,
        progress=progress,
        clip_denoised=clip_denoised,
        guidance=guidance,
    )
