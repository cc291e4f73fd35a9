"""Samplers against closed-form answers.

Data: every latent element of class y is drawn from N(mu_y, S^2). For such data the optimal
denoiser is known exactly (jointly Gaussian algebra), so it stands in for a trained model:
  DDPM:  x_t = a x_0 + b eps (a^2 = abar_t, b^2 = 1 - abar_t), V = a^2 S^2 + b^2,
         E[eps | x_t] = b / V (x_t - a mu);
  flow:  x_t = (1 - t) x_0 + t eps, v = eps - x_0,
         E[v | x_t] = -mu + (t - (1 - t) S^2) / ((1 - t)^2 S^2 + t^2) (x_t - (1 - t) mu).
Both are linear in mu, so classifier-free guidance between two such Gaussians (conditional
mu_y, null mu = 0) is exactly the optimal model of N(w mu_y, S^2): guided samples must have
mean w mu_y and std S.

The deterministic samplers map each element by the same affine map, so drawing x_T with an
exactly standardised noise makes their output statistics free of Monte-Carlo error: the
only error left is the sampler's own discretisation, which is also computed analytically.
"""

import math
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from ditkit.objectives import GaussianDiffusion, RectifiedFlow, get_sampler

S = 0.5
MEANS = torch.tensor([-1.0, 1.0, 0.0], dtype=torch.float64)  # class 0, class 1, null (index 2)
NULL = 2
SHAPE = (4, 4, 4)  # C, H, W: 4 channels so that guidance on the first 3 is visible


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Thousands of small elementwise ops: one intra-op thread is as fast on an idle machine and
    an order of magnitude faster on a loaded one (threads wait on each other at every op)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


class GaussianDenoiser:
    """Optimal model of the Gaussian data for a (respaced) DDPM process, called like DiT:
    model(x, t_original, y). With learn_sigma it also outputs the exact reverse variance
    Var(x_{i-1} | x_i), encoded as improved DDPM's interpolation value v in the second half."""

    condition_keys = ("y",)

    def __init__(self, process: GaussianDiffusion, learn_sigma: bool, prediction: str = "eps"):
        self.p, self.learn_sigma, self.prediction = process, learn_sigma, prediction
        self.map = torch.tensor(process.timestep_map, dtype=torch.float64)
        self.calls = []  # (batch size, original timestep) per call

    def __call__(self, x, t, y):
        self.calls.append((x.shape[0], float(t[0])))
        i = torch.searchsorted(self.map, t.double())
        view = (-1, 1, 1, 1)
        abar = self.p.alphas_cumprod[i].view(view)
        a, b = abar.sqrt(), (1 - abar).sqrt()
        mu = MEANS[y].view(view)
        xd = x.double()
        var_t = a**2 * S**2 + b**2
        eps = b / var_t * (xd - a * mu)
        x0 = (xd - b * eps) / a
        out = {"eps": eps, "x0": x0, "v": a * eps - b * x0}[self.prediction]
        if self.learn_sigma:
            out = torch.cat([out, self._variance_value(i, view).expand_as(out)], dim=1)
        return out.float()

    def null_condition(self, y):
        return {"y": torch.full_like(y, NULL)}

    def _variance_value(self, i, view):
        betas, abar = self.p.betas, self.p.alphas_cumprod
        abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
        alpha = 1 - betas
        var_prev = abar_prev * S**2 + 1 - abar_prev  # Var(x_{i-1}); the data itself at i = 0
        var_now = abar * S**2 + 1 - abar
        exact = var_prev - alpha * var_prev**2 / var_now  # Var(x_{i-1} | x_i) of a Gaussian chain
        post = betas * (1 - abar_prev) / (1 - abar)
        post[0] = post[1]
        lo, hi = post.log()[i], betas.log()[i]
        return (2 * (exact.log()[i] - lo) / (hi - lo) - 1).view(view)


class VelocityField:
    """Optimal velocity of the Gaussian data for rectified flow; model(x, t * 1000, y)."""

    condition_keys = ("y",)

    def __init__(self, time_scale=1000.0):
        self.time_scale = time_scale
        self.calls = []

    def __call__(self, x, t, y):
        self.calls.append((x.shape[0], float(t[0]) / self.time_scale))
        tt = (t.double() / self.time_scale).view(-1, 1, 1, 1)
        mu = MEANS[y].view(-1, 1, 1, 1)
        k = (tt - (1 - tt) * S**2) / ((1 - tt) ** 2 * S**2 + tt**2)
        return (-mu + k * (x.double() - (1 - tt) * mu)).float()

    def null_condition(self, y):
        return {"y": torch.full_like(y, NULL)}


def labels(n=128):
    return torch.arange(n) % 2


def standard_noise(y, gen_seed=0):
    """(N, C, H, W) noise whose every (class, channel) group has mean exactly 0 and std exactly 1."""
    g = torch.Generator().manual_seed(gen_seed)
    z = torch.randn(len(y), *SHAPE, generator=g, dtype=torch.float64)
    for cls in (0, 1):
        grp = z[y == cls]
        grp = (grp - grp.mean(dim=(0, 2, 3), keepdim=True)) / grp.std(
            dim=(0, 2, 3), unbiased=False, keepdim=True
        )
        z[y == cls] = grp
    return z


def ddpm_prior(process, y, target_means, z):
    """x_T from the exact marginal q(x_T) at the first step the process visits (the linear
    schedule's abar_T is 4e-5, not 0: starting from N(0, 1) would add a prior error)."""
    abar = process.alphas_cumprod[-1]
    return (abar.sqrt() * target_means + (abar * S**2 + 1 - abar).sqrt() * z).float()


def class_stats(x, y, channels=slice(0, 3)):
    """Per class: (mean, std) of x[:, channels] pooled over samples and positions."""
    out = {}
    for cls in (0, 1):
        v = x[y == cls][:, channels].double()
        out[cls] = (v.mean().item(), v.std(unbiased=False).item())
    return out


def target(y, w, guided_channels=4):
    """(N, C, 1, 1) expected means: w * mu_y on guided channels, mu_y on the others."""
    mu = MEANS[y].view(-1, 1, 1, 1).expand(-1, SHAPE[0], 1, 1).clone()
    mu[:, :guided_channels] *= w
    return mu


# ---------------------------------------------------------------------------- DDPM


def test_ddpm_250_recovers_gaussian():
    """Exact mean + exact reverse variance make ancestral DDPM an exact sampler of the Gaussian
    chain: guided samples are N(w mu_y, S^2) up to Monte-Carlo error."""
    torch.manual_seed(0)
    w = 2.0
    d = GaussianDiffusion(learn_sigma=True)
    process = d.respace("250")
    model = GaussianDenoiser(process, learn_sigma=True)
    y = labels(4096)
    x_T = ddpm_prior(process, y, target(y, w), torch.randn(len(y), *SHAPE, dtype=torch.float64))
    x = d.sample(model, x_T, {"y": y}, sampler="ddpm", steps=250, cfg_scale=w)
    # Monte-Carlo standard errors over 131k values per class: mean 0.0014, std 0.2% of S.
    for cls, (mean, std) in class_stats(x, y, slice(0, 4)).items():
        assert mean == pytest.approx(w * MEANS[cls].item(), abs=0.006)
        assert std == pytest.approx(S, rel=0.008)
    assert len(model.calls) == 250
    assert {n for n, _ in model.calls} == {2 * len(y)}  # cond + null in one batch


def test_ddpm_fixed_large_variance_is_exact_for_unit_variance_data():
    """Ho et al. 2020 sec. 3.2: sigma_t^2 = beta_t is the optimal reverse variance when
    x_0 ~ N(0, I); with the exact mean, unguided samples of N(mu_y, 1) come out with std 1."""
    global S
    saved, S = S, 1.0
    try:
        torch.manual_seed(1)
        d = GaussianDiffusion(learn_sigma=False)
        process = d.respace("250")
        y = labels(2048)
        x_T = ddpm_prior(
            process, y, target(y, 1.0), torch.randn(len(y), *SHAPE, dtype=torch.float64)
        )
        x = d.sample(
            GaussianDenoiser(process, learn_sigma=False), x_T, {"y": y}, sampler="ddpm", steps=250
        )
        # Monte-Carlo standard errors over 65k values per class: mean 0.004, std 0.28%.
        for cls, (mean, std) in class_stats(x, y, slice(0, 4)).items():
            assert mean == pytest.approx(MEANS[cls].item(), abs=0.016)
            assert std == pytest.approx(1.0, rel=0.012)
    finally:
        S = saved


def ddim_std_factor(process):
    """Analytic std of DDIM(eta=0)'s output over S for exact-prior input. With centred
    x - a mu, one step from (a, b) to (a', b') multiplies by (a a' S^2 + b b') / V (a linear
    map), while the true flow multiplies std by sqrt(V' / V)."""
    abar = process.alphas_cumprod
    abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    a, b, a2, b2 = abar.sqrt(), (1 - abar).sqrt(), abar_prev.sqrt(), (1 - abar_prev).sqrt()
    factor = (abar[-1] * S**2 + 1 - abar[-1]).sqrt()
    for i in range(len(abar)):
        factor = factor * (a[i] * a2[i] * S**2 + b[i] * b2[i]) / (a[i] ** 2 * S**2 + b[i] ** 2)
    return (factor / S).item()


@pytest.mark.parametrize("w", [1.0, 1.5])
def test_ddim_50_recovers_gaussian(w):
    d = GaussianDiffusion(learn_sigma=True)
    process = d.respace("ddim50")
    model = GaussianDenoiser(process, learn_sigma=True)
    y = labels()
    x_T = ddpm_prior(process, y, target(y, w), standard_noise(y))
    x = d.sample(model, x_T, {"y": y}, sampler="ddim", steps=50, cfg_scale=w)
    factor = ddim_std_factor(process)
    # DDIM is first order: at 50 steps its std bias for S = 0.5 is -5.5% (-1.1% at 250).
    assert factor == pytest.approx(0.9449, abs=1e-3)
    for cls, (mean, std) in class_stats(x, y, slice(0, 4)).items():
        assert mean == pytest.approx(w * MEANS[cls].item(), abs=2e-4)  # the mean is kept exactly
        assert std == pytest.approx(S * factor, rel=2e-4)
        assert std == pytest.approx(S, rel=0.06)


def test_ddim_converges_at_first_order():
    """Doubling the steps halves DDIM's std error (250 -> 500 steps)."""
    d = GaussianDiffusion(learn_sigma=False)
    y = labels(64)
    errors = []
    for steps in (250, 500):
        process = d.respace(f"ddim{steps}")
        x_T = ddpm_prior(process, y, target(y, 1.0), standard_noise(y))
        x = d.sample(GaussianDenoiser(process, False), x_T, {"y": y}, sampler="ddim", steps=steps)
        errors.append(1 - class_stats(x, y)[1][1] / S)
    assert errors[0] < 0.012
    assert errors[0] / errors[1] == pytest.approx(2.0, rel=0.1)


def test_parametrizations_give_the_same_ddim_samples():
    """eps, x0 and v prediction of the same optimal model are one model: same DDIM output."""
    y = labels(8)
    outs = []
    for prediction in ("eps", "x0", "v"):
        d = GaussianDiffusion(learn_sigma=False, prediction=prediction)
        process = d.respace("ddim25")
        x_T = ddpm_prior(process, y, target(y, 1.0), standard_noise(y))
        outs.append(
            d.sample(
                GaussianDenoiser(process, False, prediction),
                x_T,
                {"y": y},
                sampler="ddim",
                steps=25,
            )
        )
    # The float32 conversions between eps, x0 and v divide by sqrt(abar) (158x at the first step):
    # 158 x 6e-8 rounding x |x_T| ~ 5 is ~5e-5 per sample; the tolerance is 2x that.
    torch.testing.assert_close(outs[1], outs[0], atol=1e-4, rtol=0)
    torch.testing.assert_close(outs[2], outs[0], atol=1e-4, rtol=0)
    assert class_stats(outs[0], y)[1][0] == pytest.approx(1.0, abs=1e-3)


# ---------------------------------------------------------------------------- flow


def flow_std_factor(grid, method):
    """Analytic std factor of Euler / Heun on the centred variable u = x - (1 - t) mu, for which
    the exact velocity is k(t) u: Euler multiplies by 1 + dt k, Heun by
    1 + dt/2 (k(t) + k(t') (1 + dt k(t)))."""

    def k(t):
        return (t - (1 - t) * S**2) / ((1 - t) ** 2 * S**2 + t**2)

    factor = 1.0
    for t, t_next in zip(grid[:-1], grid[1:]):
        dt = t_next - t
        if method == "euler":
            factor *= 1 + dt * k(t)
        else:
            factor *= 1 + dt / 2 * (k(t) + k(t_next) * (1 + dt * k(t)))
    return factor / S


@pytest.mark.parametrize(
    "sampler,steps,shift,expected_factor,tol",
    [
        ("euler", 100, 1.0, 0.9853, 0.02),
        ("heun", 25, 1.0, 1.0007, 0.002),
        ("heun", 25, 3.0, None, 0.002),
    ],
)
@pytest.mark.parametrize("w", [1.0, 1.5])
def test_flow_ode_recovers_gaussian(sampler, steps, shift, expected_factor, tol, w):
    flow = RectifiedFlow(shift=shift)
    model = VelocityField()
    y = labels()
    x = flow.sample(
        model,
        standard_noise(y).float(),
        {"y": y},
        sampler=sampler,
        steps=steps,
        cfg_scale=w,
    )
    factor = flow_std_factor(flow.time_grid(steps, *SHAPE[1:]), sampler)
    if expected_factor is not None:
        assert factor == pytest.approx(expected_factor, abs=1e-3)
    for cls, (mean, std) in class_stats(x, y, slice(0, 4)).items():
        assert mean == pytest.approx(w * MEANS[cls].item(), abs=2e-4)
        assert std == pytest.approx(S * factor, rel=2e-4)
        assert std == pytest.approx(S, rel=tol)
    assert len(model.calls) == steps * (2 if sampler == "heun" else 1)


def test_flow_sde_recovers_gaussian():
    """Euler-Maruyama on the SDE that shares the ODE's marginals: N(w mu_y, S^2) up to
    discretisation and Monte-Carlo error."""
    torch.manual_seed(2)
    y = labels(4096)
    x = RectifiedFlow().sample(
        VelocityField(),
        torch.randn(len(y), *SHAPE),
        {"y": y},
        sampler="sde",
        steps=250,
        cfg_scale=1.5,
    )
    # Monte-Carlo standard errors: mean 0.0014, std 0.2%; the discretisation bias is about -0.3%.
    for cls, (mean, std) in class_stats(x, y, slice(0, 4)).items():
        assert mean == pytest.approx(1.5 * MEANS[cls].item(), abs=0.006)
        assert std == pytest.approx(S, rel=0.012)


@pytest.mark.parametrize("method,order", [("euler", 1), ("heun", 2)])
def test_flow_integrators_converge_at_their_order(method, order):
    y = labels(16)
    errors = []
    for steps in (20, 40):
        x = RectifiedFlow().sample(
            VelocityField(), standard_noise(y).float(), {"y": y}, sampler=method, steps=steps
        )
        errors.append(abs(class_stats(x, y)[1][1] / S - 1))
    assert errors[0] / errors[1] == pytest.approx(2.0**order, rel=0.15)


# ---------------------------------------------------------------------------- guidance options


@pytest.mark.parametrize("objective,sampler,steps", [("ddpm", "ddim", 50), ("flow", "heun", 25)])
def test_guidance_on_first_three_channels_keeps_the_fourth_conditional(objective, sampler, steps):
    """guidance_channels=3 (the DiT reference): channels 0-2 follow N(w mu_y, S^2), channel 3
    (and the learned variance) comes from the conditional prediction, N(mu_y, S^2)."""
    w = 2.0
    y = labels()
    if objective == "ddpm":
        obj = GaussianDiffusion(learn_sigma=True)
        process = obj.respace(f"ddim{steps}")
        model = GaussianDenoiser(process, learn_sigma=True)
        x_T = ddpm_prior(process, y, target(y, w, guided_channels=3), standard_noise(y))
    else:
        obj, model, x_T = RectifiedFlow(), VelocityField(), standard_noise(y).float()
    x = obj.sample(
        model,
        x_T,
        {"y": y},
        sampler=sampler,
        steps=steps,
        cfg_scale=w,
        guidance_channels=3,
    )
    guided, plain = class_stats(x, y, slice(0, 3)), class_stats(x, y, slice(3, 4))
    for cls in (0, 1):
        assert guided[cls][0] == pytest.approx(w * MEANS[cls].item(), abs=2e-4)
        assert plain[cls][0] == pytest.approx(MEANS[cls].item(), abs=2e-4)


@pytest.mark.parametrize(
    "objective,sampler,interval", [("ddpm", "ddpm", (300, 700)), ("flow", "euler", (0.2, 0.6))]
)
def test_guidance_interval_guides_only_inside_it(objective, sampler, interval):
    """Inside [low, high] (objective time) the model sees one batch of 2N (cond + null);
    outside, only the N conditional samples."""
    y = labels(4)
    if objective == "ddpm":
        obj = GaussianDiffusion(learn_sigma=True)
        model = GaussianDenoiser(obj.respace("50"), learn_sigma=True)
        steps, times = 50, obj.respace("50").timestep_map
    else:
        obj, model, steps = RectifiedFlow(shift=2.0), VelocityField(), 20
        times = obj.time_grid(steps, *SHAPE[1:])[:-1]
    torch.manual_seed(0)
    obj.sample(
        model,
        torch.randn(4, *SHAPE),
        {"y": y},
        sampler=sampler,
        steps=steps,
        cfg_scale=3.0,
        guidance_interval=interval,
    )

    def step(t):  # the step a call belongs to (the model sees float32 times)
        return min(range(len(times)), key=lambda i: abs(times[i] - t))

    inside = {i for i, t in enumerate(times) if interval[0] <= t <= interval[1]}
    assert 0 < len(inside) < steps
    assert {step(t) for n, t in model.calls if n == 8} == inside
    assert {step(t) for n, t in model.calls if n == 4} == set(range(steps)) - inside
    assert len(model.calls) == steps


def test_guidance_takes_the_null_condition_from_the_model():
    """The unconditional half is whatever the model's null_condition says: pointing it at class 0
    instead of the null mean 0 gives exactly the field guided between classes (w mu_1 + (1 - w) mu_0
    for class-1 samples, a closed form); a model without null_condition is refused."""

    class NullIsClassZero(VelocityField):
        def null_condition(self, y):
            return {"y": torch.zeros_like(y)}

    y = labels(8)
    w = 2.0
    x = RectifiedFlow().sample(
        NullIsClassZero(), standard_noise(y).float(), {"y": y}, steps=50, cfg_scale=w
    )
    stats = class_stats(x, y, slice(0, 4))
    # Class 1: w mu_1 + (1 - w) mu_0 = 3; class 0 is guided towards itself: mu_0 = -1. The noise
    # is exactly standardised, so the means carry only Euler-50's discretisation error (< 0.01).
    assert stats[1][0] == pytest.approx(w * MEANS[1].item() + (1 - w) * MEANS[0].item(), abs=0.03)
    assert stats[0][0] == pytest.approx(MEANS[0].item(), abs=0.03)

    class NoNull:
        condition_keys = ("y",)

        def __call__(self, x, t, y):
            return x

    with pytest.raises(ValueError, match="null_condition"):
        RectifiedFlow().sample(
            NoNull(), standard_noise(y).float(), {"y": y}, steps=5, cfg_scale=2.0
        )


def test_flow_exact_velocity_sanity_at_the_ends():
    """Independent check of the closed form used above: at t = 1, v = x - mu; at t = 0, v = -x."""
    y = torch.tensor([1])
    x = torch.full((1, *SHAPE), 0.3)
    field = VelocityField()
    assert torch.allclose(field(x, torch.tensor([1000.0]), y), x - 1.0)
    assert torch.allclose(field(x, torch.tensor([0.0]), y), -x)
    assert math.isclose(RectifiedFlow().time_grid(4, 4, 4)[2], 0.5)


# ---------------------------------------------------------------------------- configs

CONF = Path(__file__).resolve().parents[1] / "conf"
SAMPLER_CONFIGS = {
    "ddpm": ("ddpm", 250),
    "ddim": ("ddpm", 50),
    "euler": ("flow", 50),
    "heun": ("flow", 25),
    "sde": ("flow", 250),
}


def compose_cfg(objective, sampler):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(
            overrides=[f"+objective={objective}", f"+sampler={sampler}", "+model.learn_sigma=true"]
        )


def test_objective_configs_are_the_reference_settings():
    ddpm = instantiate(compose_cfg("ddpm", "ddpm").objective)
    assert isinstance(ddpm, GaussianDiffusion)
    assert (ddpm.num_timesteps, ddpm.schedule, ddpm.prediction, ddpm.learn_sigma) == (
        1000,
        "linear",
        "eps",
        True,
    )
    flow = instantiate(compose_cfg("flow", "euler").objective)
    assert isinstance(flow, RectifiedFlow)
    assert (flow.time_sampling, flow.logit_mean, flow.logit_std, flow.shift, flow.time_scale) == (
        "logit_normal",
        0.0,
        1.0,
        1.0,
        1000.0,
    )


@pytest.mark.parametrize("name", list(SAMPLER_CONFIGS))
def test_sampler_configs_run_with_their_objective_and_refuse_the_other(name):
    objective, steps = SAMPLER_CONFIGS[name]
    other = "flow" if objective == "ddpm" else "ddpm"
    cfg = compose_cfg(objective, name)
    assert (cfg.sampler.name, cfg.sampler.steps) == (name, steps)
    assert get_sampler(name).objective == objective  # the registry is the one definition
    obj = instantiate(cfg.objective)
    obj.check_sampler(cfg.sampler.name)
    y = labels()
    w = 1.5
    if objective == "ddpm":
        process = obj.respace(f"ddim{steps}" if name == "ddim" else str(steps))
        model = GaussianDenoiser(process, learn_sigma=True)
        x_T = ddpm_prior(process, y, target(y, w), standard_noise(y))
    else:
        model, x_T = VelocityField(), standard_noise(y).float()
    torch.manual_seed(0)
    x = obj.sample(
        model,
        x_T,
        {"y": y},
        sampler=cfg.sampler.name,
        steps=cfg.sampler.steps,
        cfg_scale=w,
        **cfg.sampler.options,
    )
    for cls, (mean, _) in class_stats(x, y, slice(0, 4)).items():
        assert mean == pytest.approx(
            w * MEANS[cls].item(), abs=0.03
        )  # 8k values: MC error 0.006 at most
    wrong = instantiate(compose_cfg(other, name).objective)
    with pytest.raises(
        ValueError, match=f"belongs to objective={objective}.*choose one of sampler="
    ):
        wrong.check_sampler(cfg.sampler.name)
    with pytest.raises(ValueError, match="choose one of sampler="):
        wrong.sample(model, x_T, {"y": y}, sampler=name, steps=steps)
