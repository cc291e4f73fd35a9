"""RectifiedFlow: the loss of the exact velocity field equals its analytic minimum; time
sampling, time shift, cosine loss and learned-sigma handling against closed forms."""

import math

import pytest
import torch
from scipy import integrate, stats

from ditkit.objectives import RectifiedFlow
from ditkit.objectives.flow import mode_time, shift_time

MU, S = 0.7, 0.5  # data: every element ~ N(MU, S^2)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Many small ops: one intra-op thread is as fast on an idle machine and far faster on a busy one."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def exact_velocity(x, t_model, y=None):
    """E[eps - x0 | x_t] for x_t = (1 - t) x0 + t eps, x0 ~ N(MU, S^2); t_model = 1000 t."""
    t = (t_model.double() / 1000).view(-1, 1, 1, 1)
    k = (t - (1 - t) * S**2) / ((1 - t) ** 2 * S**2 + t**2)
    return (-MU + k * (x.double() - (1 - t) * MU)).float()


def min_loss(t):
    """Var(eps - x0 | x_t) = Var(v) - Cov(v, x_t)^2 / Var(x_t), the least mean squared error at t."""
    cov = t - (1 - t) * S**2
    return 1 + S**2 - cov**2 / ((1 - t) ** 2 * S**2 + t**2)


def data(n, seed=0):
    # An offset seed: the same seed for data and the global RNG would make eps equal (x0 - MU) / S.
    g = torch.Generator().manual_seed(10_000 + seed)
    return MU + S * torch.randn(n, 4, 4, 4, generator=g)


def test_exact_velocity_field_attains_the_analytic_minimum():
    torch.manual_seed(0)
    flow = RectifiedFlow()
    x0 = data(4096)
    for t_value in (0.05, 0.3, 0.5, 0.8, 0.97):
        t = torch.full((len(x0),), t_value)
        loss = flow.training_losses(exact_velocity, {"x": x0}, t)["loss"].mean().item()
        # 262k squared residuals: Monte-Carlo relative error about 0.3%.
        assert loss == pytest.approx(min_loss(t_value), rel=0.015)
        # Any other field pays its mean squared distance on top: + delta^2.
        shifted = lambda x, tt, y=None: exact_velocity(x, tt) + 0.2  # noqa: E731
        noise = torch.randn_like(x0)
        gap = (
            (
                flow.training_losses(shifted, {"x": x0}, t, noise)["loss"]
                - flow.training_losses(exact_velocity, {"x": x0}, t, noise)["loss"]
            )
            .mean()
            .item()
        )
        assert gap == pytest.approx(0.04, abs=2e-3)


@pytest.mark.parametrize(
    "sampling,density",
    [
        ("uniform", lambda t: 1.0),
        ("logit_normal", lambda t: stats.norm.pdf(math.log(t / (1 - t))) / (t * (1 - t))),
    ],
)
def test_expected_loss_over_drawn_times_is_the_integrated_minimum(sampling, density):
    """With t drawn by the objective: E_t[min_loss(t)] = int min_loss(t) p(t) dt."""
    torch.manual_seed(1)
    flow = RectifiedFlow(time_sampling=sampling)
    x0 = data(8192, seed=1)
    loss = flow.training_losses(exact_velocity, {"x": x0})["loss"].mean().item()
    expected, _ = integrate.quad(lambda t: min_loss(t) * density(t), 0, 1)
    assert loss == pytest.approx(expected, rel=0.02)


def test_model_sees_scaled_time_and_learn_sigma_uses_first_half():
    seen = []

    def model(x, t, y=None):
        seen.append(t.clone())
        v = exact_velocity(x, t)
        return torch.cat(
            [v, torch.full_like(v, 1e3)], dim=1
        )  # a variance half the flow must ignore

    x0 = data(3)
    t = torch.tensor([0.1, 0.5, 0.9])
    noise = torch.randn_like(x0)
    a = RectifiedFlow().training_losses(model, {"x": x0}, t, noise)["loss"]
    b = RectifiedFlow().training_losses(exact_velocity, {"x": x0}, t, noise)["loss"]
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert seen[0].tolist() == pytest.approx([100.0, 500.0, 900.0])
    assert RectifiedFlow(time_scale=1.0).velocity(model, x0, t).shape == x0.shape
    assert seen[-1].tolist() == pytest.approx([0.1, 0.5, 0.9])
    with pytest.raises(ValueError, match="expected 4 or 8"):
        RectifiedFlow().training_losses(lambda x, tt, y=None: torch.cat([x] * 3, 1), {"x": x0}, t)


def test_interpolation_and_target():
    """x_t = (1 - t) x0 + t eps, target eps - x0: a model returning the target has zero loss."""
    x0, noise = data(2), torch.randn(2, 4, 4, 4)
    t = torch.tensor([0.25, 1.0])
    x_t = RectifiedFlow().interpolate(x0, t, noise)
    torch.testing.assert_close(x_t[0], 0.75 * x0[0] + 0.25 * noise[0])
    torch.testing.assert_close(x_t[1], noise[1])
    terms = RectifiedFlow().training_losses(lambda x, tt, y=None: noise - x0, {"x": x0}, t, noise)
    assert terms["loss"].abs().max() == 0


def test_cosine_velocity_direction_loss():
    """LightningDiT: loss = mse + w * mean over positions of (1 - cos(v_pred, v) over channels)."""
    x0, noise = data(2), torch.randn(2, 4, 4, 4)
    target = noise - x0
    flow = RectifiedFlow(cosine_loss_weight=0.5)
    t = torch.tensor([0.3, 0.6])
    same_dir = flow.training_losses(lambda x, tt, y=None: 2 * target, {"x": x0}, t, noise)
    torch.testing.assert_close(same_dir["cos"], torch.zeros(2), atol=1e-6, rtol=0)
    torch.testing.assert_close(
        same_dir["loss"], (target**2).mean(dim=(1, 2, 3)), atol=1e-5, rtol=1e-5
    )
    opposite = flow.training_losses(lambda x, tt, y=None: -target, {"x": x0}, t, noise)
    torch.testing.assert_close(opposite["cos"], torch.full((2,), 2.0))
    torch.testing.assert_close(opposite["loss"], opposite["mse"] + 1.0)
    assert "cos" not in RectifiedFlow().training_losses(
        lambda x, tt, y=None: target, {"x": x0}, t, noise
    )


@pytest.mark.parametrize(
    "kwargs,quantile",
    [
        (dict(time_sampling="uniform"), lambda q: q),
        (dict(time_sampling="logit_normal"), lambda q: 1 / (1 + math.exp(-stats.norm.ppf(q)))),
        (
            dict(time_sampling="logit_normal", logit_mean=0.5, logit_std=0.7),
            lambda q: 1 / (1 + math.exp(-(0.5 + 0.7 * stats.norm.ppf(q)))),
        ),
        # SD3 eq. 20: t = f(u) is decreasing in u, so P(t <= f(u)) = 1 - u and the q-quantile is f(1 - q).
        (
            dict(time_sampling="mode", mode_scale=1.29),
            lambda q: mode_time(torch.tensor(1 - q), 1.29).item(),
        ),
        # A static shift maps quantiles through the shift: q-quantile of shift(U) is shift(q).
        (dict(time_sampling="uniform", shift=3.0), lambda q: 3 * q / (1 + 2 * q)),
    ],
)
def test_time_sampling_quantiles(kwargs, quantile):
    torch.manual_seed(0)
    t = RectifiedFlow(**kwargs).sample_t(200_000, height=8, width=8)
    assert 0 <= t.min() and t.max() <= 1
    for q in (0.1, 0.25, 0.5, 0.75, 0.9):
        assert torch.quantile(t, q).item() == pytest.approx(quantile(q), abs=4e-3)


def test_time_shift_static_and_resolution_dependent():
    assert shift_time(0.5, 3.0) == pytest.approx(0.75)  # SD3 eq. 23
    assert shift_time(0.0, 3.0) == 0 and shift_time(1.0, 3.0) == 1
    flow = RectifiedFlow(shift=1.5, shift_reference_area=16 * 16)
    assert flow.effective_shift(16, 16) == pytest.approx(1.5)
    assert flow.effective_shift(32, 32) == pytest.approx(3.0)  # 4x the area: sqrt(4) = 2x the shift
    grid = flow.time_grid(4, 32, 32)
    assert grid == pytest.approx(
        [1.0, 3 * 0.75 / (1 + 2 * 0.75), 0.75, 3 * 0.25 / (1 + 2 * 0.25), 0.0]
    )
    torch.manual_seed(0)
    u = torch.rand(5)
    torch.manual_seed(0)
    t = RectifiedFlow(time_sampling="uniform", shift=2.0, shift_training=False).sample_t(
        5, height=8, width=8
    )
    torch.testing.assert_close(t, u)


def test_training_draws_t_then_noise_from_the_global_rng():
    flow = RectifiedFlow()
    x0 = data(3)
    torch.manual_seed(5)
    drawn = flow.training_losses(exact_velocity, {"x": x0})["loss"]
    torch.manual_seed(5)
    t = torch.sigmoid(torch.randn(3))
    noise = torch.randn_like(x0)
    torch.testing.assert_close(
        drawn, flow.training_losses(exact_velocity, {"x": x0}, t, noise)["loss"]
    )


def test_bad_options_and_samplers_are_refused_clearly():
    with pytest.raises(ValueError, match="uniform, logit_normal, mode"):
        RectifiedFlow(time_sampling="beta")
    with pytest.raises(ValueError, match="mode_scale"):
        RectifiedFlow(mode_scale=3.0)
    with pytest.raises(ValueError, match="shift must be > 0"):
        RectifiedFlow(shift=0.0)
    x = torch.randn(2, 4, 4, 4)
    with pytest.raises(ValueError, match="sampler=euler, heun, sde"):
        RectifiedFlow().sample(exact_velocity, x, {"y": None}, sampler="ddpm", steps=10)
    with pytest.raises(ValueError, match=r"sampler=heun has no option \[.diffusion_norm.\]"):
        RectifiedFlow().sample(
            exact_velocity, x, {"y": None}, sampler="heun", steps=10, diffusion_norm=2.0
        )
    with pytest.raises(ValueError, match="steps must be >= 1"):
        RectifiedFlow().sample(exact_velocity, x, {"y": None}, sampler="euler", steps=0)
