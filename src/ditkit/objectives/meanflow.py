"""MeanFlow (Geng et al., "Mean Flows for One-step Generative Modeling", arXiv 2505.13447).

The network learns the average velocity over an interval [r, t] of the rectified flow
z_t = (1 - t) x + t eps (t = 1 noise, as flow.py):

    u(z_t, r, t) = 1 / (t - r) * integral_r^t v(z_s, s) ds                      (paper eq. 3)

Differentiating (t - r) u = integral_r^t v in t gives the MeanFlow identity

    u(z_t, r, t) = v(z_t, t) - (t - r) d/dt u(z_t, r, t)                        (paper eq. 6)

whose total derivative along the trajectory is a Jacobian-vector product with the tangent
(dz/dt, dr/dt, dt/dt) = (v, 0, 1) (eq. 8). The training target replaces v by the conditional
velocity eps - x and stops the gradient (eqs. 9-10); one step samples x = eps - u(eps, 0, 1)
(eq. 12). Classifier-free guidance is folded into the target (Sec. 4.2, eqs. 13-19):

    v_g = omega * v + kappa * u(z_t, t, t | c) + (1 - omega - kappa) * u(z_t, t, t | null)

so sampling stays at one network call. The official code is Gsunshine/meanflow (JAX,
meanflow.py: `sample_tr`, `guidance_fn`, `cond_drop`, `forward`); this file follows it, with the
names of the paper. Improved MeanFlow (Geng et al., arXiv 2512.02012, Sec. 4) instead gives the
guidance scale to the network as an input, drawn per sample in training, so one model serves every
scale at test time: `guidance_input=[low, high]` (DiT `guidance_input=true`).

Attention: PyTorch's fused SDPA kernels (flash, memory-efficient, and the CPU flash kernel) have no
forward-mode derivative (pytorch issue 165530), so the JVP runs under
`sdpa_kernel(SDPBackend.MATH)`, the decomposed kernel autograd can push tangents through; every
other model call (the guidance forwards, sampling) keeps the fused kernels.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm.auto import tqdm

from .guidance import Guidance, Model
from .protocol import DiffusionObjective, model_inputs
from .samplers import register_sampler
from .schedule import mean_flat
from .terms import Term, TermInputs

TIME_SAMPLINGS = ("uniform", "logit_normal")
SECOND_TIMES = ("interval", "r")


@contextmanager
def labels_kept(model: torch.nn.Module) -> Iterator[None]:
    """Pause the backbone's own label dropout: MeanFlow drops labels itself, because the target of a
    dropped sample is the unguided velocity (reference `cond_drop`); a second, hidden dropout would
    train the null class toward guided targets. Pauses every submodule with a `dropout_prob`
    (DiT's LabelEmbedder)."""
    saved = [(m, m.dropout_prob) for m in model.modules() if hasattr(m, "dropout_prob")]
    for module, _ in saved:
        module.dropout_prob = 0.0
    try:
        yield
    finally:
        for module, prob in saved:
            module.dropout_prob = prob


def _select(mask: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a where mask (N,) else b, for tensors with leading dim N."""
    return torch.where(mask.view(-1, *([1] * (a.ndim - 1))), a, b)


class MeanFlow(DiffusionObjective):
    """The MeanFlow objective on a backbone with a second time input (DiT `second_time=true`).

    time_sampling: t and r each drawn "uniform" or "logit_normal" sigmoid(N(logit_mean,
    logit_std^2)), then sorted so r <= t (reference `sample_tr`; paper Table 1c: logit-normal
    (-0.4, 1.0) best). equal_fraction: the share of the batch with r = t, where the target is the
    plain flow-matching velocity (reference `data_proportion` 0.75; paper Table 1a: 25% r != t).
    second_time: what the backbone's second time is, "interval" t - r (the reference's h) or "r".
    omega, kappa: guidance folded into the target (paper eq. 19; omega=1, kappa=0: none; the
    reference's B/4 default is omega=1, kappa=0.5, effective scale omega / (1 - kappa) = 2),
    applied where t lies in guidance_interval. class_dropout_prob: labels replaced by the null
    condition (their target is then the unguided v). norm_p, norm_eps: adaptive loss weight
    1 / (||u - u_tgt||^2 + norm_eps)^norm_p, stop-gradient (paper eq. 22; reference p=1, eps=0.01).
    guidance_input: [low, high] turns on improved MeanFlow's guidance-as-input: omega ~ U(low, high)
    per sample, given to the model as `w` (kappa unused). time_scale: the model sees t and t2 times
    time_scale; 1 as the JAX reference (t in [0, 1]). Not flow.py's 1000: the target holds du/dt,
    and the sinusoidal embedding of 1000 t has frequencies up to 1000, which made du/dt and the
    targets grow without bound on the digits (mse 1.6 -> 92 in 130 steps). terms: extra losses
    ({name: Term}, terms.py).
    """

    name = "meanflow"
    default_sampler = "meanflow1"
    # The training forward is a JVP: DiffusionModule refuses activation checkpointing with it
    # (torch.utils.checkpoint fails under forward-mode AD); compile and FSDP2 work.
    forward_mode_ad = True

    def __init__(
        self,
        time_sampling: str = "logit_normal",
        logit_mean: float = -0.4,
        logit_std: float = 1.0,
        equal_fraction: float = 0.75,
        second_time: str = "interval",
        omega: float = 1.0,
        kappa: float = 0.0,
        guidance_interval: Sequence[float] = (0.0, 1.0),
        class_dropout_prob: float = 0.1,
        norm_p: float = 1.0,
        norm_eps: float = 0.01,
        guidance_input: Sequence[float] | None = None,
        time_scale: float = 1.0,
        terms: Mapping[str, Term] | None = None,
    ):
        super().__init__(terms)
        reading = [key for key, term in self.terms.items() if term.depths]
        if reading:
            raise ValueError(
                f"objective=meanflow does not record block outputs yet, so terms {reading} that "
                "read them cannot run with it; use them with objective=flow"
            )
        if time_sampling not in TIME_SAMPLINGS:
            raise ValueError(
                f"unknown time_sampling {time_sampling!r}; choose one of {', '.join(TIME_SAMPLINGS)}"
            )
        if second_time not in SECOND_TIMES:
            raise ValueError(
                f"unknown second_time {second_time!r}; choose one of {', '.join(SECOND_TIMES)}"
            )
        if logit_std <= 0:
            raise ValueError(f"logit_std must be > 0, got {logit_std}")
        if not 0.0 <= equal_fraction <= 1.0:
            raise ValueError(
                f"equal_fraction (share with r = t) must be in [0, 1], got {equal_fraction}"
            )
        if not 0.0 <= class_dropout_prob < 1.0:
            raise ValueError(f"class_dropout_prob must be in [0, 1), got {class_dropout_prob}")
        if norm_eps <= 0 and norm_p > 0:
            raise ValueError(f"norm_eps must be > 0 with norm_p > 0, got {norm_eps}")
        low, high = (float(v) for v in guidance_interval)
        if low > high:
            raise ValueError(f"guidance_interval must be (low, high), got {guidance_interval}")
        if guidance_input is not None:
            guidance_input = tuple(float(v) for v in guidance_input)
            if len(guidance_input) != 2 or not 1.0 <= guidance_input[0] <= guidance_input[1]:
                raise ValueError(
                    f"guidance_input must be [low, high] with 1 <= low <= high, got {guidance_input}"
                )
            if omega != 1.0 or kappa != 0.0:
                raise ValueError(
                    "guidance_input draws omega per sample; leave omega=1 and kappa=0 with it"
                )
        self.time_sampling = time_sampling
        self.logit_mean, self.logit_std = float(logit_mean), float(logit_std)
        self.equal_fraction = float(equal_fraction)
        self.second_time = second_time
        self.omega, self.kappa = float(omega), float(kappa)
        self.guidance_interval = (low, high)
        self.class_dropout_prob = float(class_dropout_prob)
        self.norm_p, self.norm_eps = float(norm_p), float(norm_eps)
        self.guidance_input = guidance_input
        self.time_scale = float(time_scale)

    # ------------------------------------------------------------------ the backbone's inputs
    def bind(self, model: torch.nn.Module) -> None:
        """Refuse a backbone without the inputs MeanFlow feeds it, naming the option to set."""
        if not getattr(model, "second_time", False):
            raise ValueError(
                f"objective=meanflow needs a backbone with a second time input (r or t - r); "
                f"{type(model).__name__} has none: set model.second_time=true (DiT, JiT)"
            )
        wants_w = self.guidance_input is not None
        if bool(getattr(model, "guidance_input", False)) != wants_w:
            raise ValueError(
                f"objective.guidance_input={list(self.guidance_input or []) or None} needs "
                f"model.guidance_input={str(wants_w).lower()} (the guidance scale as an input)"
            )
        if (self.guided or wants_w or self.class_dropout_prob > 0) and not hasattr(
            model, "null_condition"
        ):
            raise ValueError("guidance and label dropout need a backbone with null_condition")
        super().bind(model)

    @property
    def guided(self) -> bool:
        """Whether guidance is folded into the target (omega, kappa other than 1, 0)."""
        return self.omega != 1.0 or self.kappa != 0.0

    def time_inputs(self, t: torch.Tensor, r: torch.Tensor) -> dict[str, torch.Tensor]:
        """(t, t2) as the model sees them: t and the second time, times time_scale."""
        second = t - r if self.second_time == "interval" else r
        return {"t": t * self.time_scale, "t2": second * self.time_scale}

    def average_velocity(
        self,
        model: Model,
        z: torch.Tensor,
        t: torch.Tensor,
        r: torch.Tensor,
        condition: Mapping[str, torch.Tensor],
    ) -> torch.Tensor:
        """u(z, r, t): (N, C, H, W) for z: (N, C, H, W), t, r: (N,) (the first C channels)."""
        times = self.time_inputs(t, r)
        out = model(z, times["t"], t2=times["t2"], **condition)
        return self._channels(out, z)

    @staticmethod
    def _channels(out: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        c = z.shape[1]
        if out.shape[1] not in (c, 2 * c):
            raise ValueError(
                f"the model gave {out.shape[1]} channels for {c}-channel input; expected {c} or {2 * c}"
            )
        return out[:, :c].to(z.dtype)

    # ------------------------------------------------------------------ training
    def _draw_time(self, n: int, device) -> torch.Tensor:
        if self.time_sampling == "uniform":
            return torch.rand(n, device=device)
        return torch.sigmoid(self.logit_mean + self.logit_std * torch.randn(n, device=device))

    def sample_tr(self, n: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(t, r), each (N,), r <= t; the first round(equal_fraction * N) have r = t (reference
        `sample_tr`: two draws, sorted, then r set to t on a fixed share of the batch)."""
        a, b = self._draw_time(n, device), self._draw_time(n, device)
        t, r = torch.maximum(a, b), torch.minimum(a, b)
        equal = torch.arange(n, device=device) < int(n * self.equal_fraction)
        return t, torch.where(equal, t, r)

    @torch.no_grad()
    def guided_target_velocity(
        self,
        model: Model,
        z: torch.Tensor,
        t: torch.Tensor,
        v: torch.Tensor,
        condition: dict,
        null: dict,
        w: torch.Tensor | None,
    ) -> torch.Tensor:
        """v_g of paper eq. 19 (reference `guidance_fn`): the network's own instantaneous velocity
        u(z, t, t) under the condition and the null condition (one batch of 2N, no gradient),
        mixed with the sample's v (the conditional half only when kappa != 0). With guidance_input:
        v_u + w (v - v_u) (w: (N,))."""
        shape = (-1, *([1] * (z.ndim - 1)))
        if w is not None or self.kappa == 0.0:
            # Only the unconditional half is needed (reference: kappa == 0 branch): N, not 2N.
            extra = {} if w is None else {"w": w}
            v_u = self.average_velocity(model, z, t, t, {**null, **extra}).to(v.dtype)
            if w is not None:
                return v_u + w.view(shape) * (v - v_u)
            v_c = torch.zeros_like(v_u)
        else:
            n = z.shape[0]
            both = {k: torch.cat([condition[k], null[k]]) for k in condition}
            tt = torch.cat([t, t])
            out = self.average_velocity(model, torch.cat([z, z]), tt, tt, both).to(v.dtype)
            v_c, v_u = out[:n], out[n:]
        low, high = self.guidance_interval
        inside = ((t >= low) & (t <= high)).view(shape).to(v.dtype)
        omega, kappa = 1 + inside * (self.omega - 1), inside * self.kappa  # 1, 0 outside
        return omega * v + kappa * v_c + (1 - omega - kappa) * v_u

    def jvp(
        self,
        model: Model,
        z: torch.Tensor,
        t: torch.Tensor,
        r: torch.Tensor,
        tangent_z: torch.Tensor,
        condition: Mapping[str, torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(u, du/dt): u(z, r, t) and its derivative along (dz, dr, dt) = (tangent_z, 0, 1), one
        forward-mode pass (torch.func.jvp; paper eq. 8, reference `jax.jvp`). u keeps its graph to
        the parameters; du/dt is returned detached. Attention uses SDPA's math kernel here only."""

        def u_fn(z_, t_, r_):
            return self.average_velocity(model, z_, t_, r_, condition)

        with sdpa_kernel([SDPBackend.MATH]):
            u, du_dt = torch.func.jvp(
                u_fn, (z, t, r), (tangent_z, torch.ones_like(t), torch.zeros_like(r))
            )
        return u, du_dt.detach()

    def training_losses(
        self, model: Model, batch: Mapping, t=None, r=None, noise=None, drop=None
    ) -> dict:
        """Per-sample losses (N,): `loss` (adaptively weighted), `mse` (mean squared error to the
        target, unweighted, for logging), `v_mse` (u against the sample's v, as the reference
        monitors), one per term.

        batch: {"x": (N, C, H, W), condition fields}; t, r: (N,) (drawn when None: t, r, noise,
        guidance omega, label drop, in that order from the global RNG); drop: (N,) bool."""
        x, condition = model_inputs(model, batch)
        n = x.shape[0]
        if t is None or r is None:
            t, r = self.sample_tr(n, x.device)
        if noise is None:
            noise = torch.randn_like(x)
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        x, noise = x.to(dtype), noise.to(dtype)
        tb = t.view(-1, *([1] * (x.ndim - 1)))
        z = (1 - tb) * x + tb * noise
        v = noise - x  # the conditional velocity dz/dt
        w = None
        if self.guidance_input is not None:
            low, high = self.guidance_input
            w = low + (high - low) * torch.rand(n, device=x.device)
        if drop is None:
            drop = torch.rand(n, device=x.device) < self.class_dropout_prob
        null = model.null_condition(**condition) if hasattr(model, "null_condition") else {}
        with labels_kept(model):
            v_g = v
            if self.guided or w is not None:
                v_g = self.guided_target_velocity(model, z, t, v, condition, null, w)
            if null:
                # Dropped labels: the null condition, and the unguided velocity as the target
                # (reference `cond_drop`).
                condition = {k: _select(drop, null[k], val) for k, val in condition.items()}
                v_g = _select(drop, v, v_g)
            if w is not None:
                condition = {**condition, "w": w}
            u, du_dt = self.jvp(model, z, t, r, v_g, condition)
        u = u.to(dtype)
        interval = (t - r).clamp(0.0, 1.0).view(-1, *([1] * (x.ndim - 1)))
        target = (v_g - interval * du_dt.to(dtype)).detach()  # paper eq. 10, stop-gradient
        sq = ((u - target) ** 2).flatten(1).sum(1)  # summed over pixels, as the reference
        weight = (sq.detach() + self.norm_eps) ** self.norm_p
        losses = {
            "loss": sq / weight,
            "mse": mean_flat((u - target) ** 2).detach(),
            "v_mse": mean_flat((u - v) ** 2).detach(),
        }
        return self.add_terms(losses, TermInputs(model, batch, z, t, u, {}))

    # ------------------------------------------------------------------ sampling
    def guided_average_velocity(
        self,
        model: Model,
        z: torch.Tensor,
        t: float,
        r: float,
        model_kwargs: dict | None,
        guidance: Guidance,
        w: float | None,
    ) -> torch.Tensor:
        """u(z, r, t) at numbers t >= r, guided when `guidance` is active (at time t)."""
        n = z.shape[0]
        dtype = torch.float64 if z.dtype == torch.float64 else torch.float32
        times = self.time_inputs(
            torch.full((n,), t, device=z.device, dtype=dtype),
            torch.full((n,), r, device=z.device, dtype=dtype),
        )
        kwargs = {**(model_kwargs or {}), "t2": times["t2"]}
        if getattr(model, "guidance_input", False):
            if w is None:
                raise ValueError(
                    "this model takes the guidance scale as an input (guidance_input): give it "
                    "with sampler.options.guidance_scale=W"
                )
            kwargs["w"] = torch.full((n,), float(w), device=z.device, dtype=dtype)
        return self._channels(guidance(model, z, times["t"], kwargs, t, z.shape[1]), z)


def _meanflow_steps(objective, model, x_T, model_kwargs, steps, guidance, progress, name, w):
    """z_r = z_t - (t - r) u(z_t, r, t) over `steps` equal intervals from t = 1 to 0 (paper eq. 12
    and its multi-step form; reference `solver_step`)."""
    if int(steps) < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    grid = [1 - i / int(steps) for i in range(int(steps) + 1)]
    z = x_T
    for i in tqdm(range(int(steps)), disable=not progress, desc=name):
        t, r = grid[i], grid[i + 1]
        u = objective.guided_average_velocity(model, z, t, r, model_kwargs, guidance, w)
        z = z - (t - r) * u
    return z


@register_sampler(
    "meanflow1",
    "meanflow",
    default_steps=1,
    guidance_scale=None,
    description="MeanFlow one step: x = eps - u(eps, 0, 1) (1 NFE)",
)
def meanflow1_sampler(
    objective, model, x_T, model_kwargs, *, steps, guidance, progress, guidance_scale=None
):
    """guidance_scale: the `w` input of a guidance_input model (improved MeanFlow)."""
    return _meanflow_steps(
        objective, model, x_T, model_kwargs, steps, guidance, progress, "meanflow1", guidance_scale
    )


@register_sampler(
    "meanflow2",
    "meanflow",
    default_steps=2,
    guidance_scale=None,
    description="MeanFlow two steps, 1 -> 0.5 -> 0 (2 NFE)",
)
def meanflow2_sampler(
    objective, model, x_T, model_kwargs, *, steps, guidance, progress, guidance_scale=None
):
    """guidance_scale: the `w` input of a guidance_input model (improved MeanFlow)."""
    return _meanflow_steps(
        objective, model, x_T, model_kwargs, steps, guidance, progress, "meanflow2", guidance_scale
    )
