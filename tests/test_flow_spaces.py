"""Rectified flow's prediction and loss spaces (v | x | eps), t clipping and noise scale, against
closed-form Gaussian data.

Data: every element of class y is N(mu_y, S^2); x_t = (1 - t) x_0 + t n, n = sigma eps. Then
V = (1 - t)^2 S^2 + t^2 sigma^2, g = (1 - t) S^2 / V and E[x_0 | x_t] = mu + g (x_t - (1 - t) mu)
(jointly Gaussian algebra); E[v | x_t] and E[eps | x_t] follow by the exact conversions. The
conditional variances are Var(x_0 | x_t) = S^2 t^2 sigma^2 / V, Var(v | x_t) = S^2 sigma^2 / V and
Var(eps | x_t) = S^2 (1 - t)^2 / V.
"""

import pytest
import torch

from ditkit.objectives import RectifiedFlow
from ditkit.objectives.flow_spaces import SPACES, convert

S = 0.5
MEANS = torch.tensor([-1.0, 1.0, 0.0], dtype=torch.float64)  # class 0, class 1, null (index 2)
NULL = 2
SHAPE = (4, 4, 4)
T_EPS = 0.05


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def posterior_x0(x, t, mu, sigma):
    """E[x_0 | x_t] for the Gaussian data (float64); x: (N, C, H, W), t, mu: (N, 1, 1, 1)."""
    var = (1 - t) ** 2 * S**2 + t**2 * sigma**2
    return mu + (1 - t) * S**2 / var * (x - (1 - t) * mu)


class GaussianPredictor:
    """The optimal network of the Gaussian data in one prediction space, called like DiT:
    model(x, t * time_scale, y). Its v and eps come from E[x_0 | x_t] by the exact (unclipped)
    formulas; at t = 0 (x) and t = 1 (eps), where those divide by 0, the limits are used."""

    condition_keys = ("y",)

    def __init__(self, prediction, sigma=1.0, time_scale=1000.0):
        self.prediction, self.sigma, self.time_scale = prediction, sigma, time_scale
        self.calls = 0

    def __call__(self, x, t, y):
        self.calls += 1
        tt = (t.double() / self.time_scale).view(-1, 1, 1, 1)
        mu = MEANS[y].view(-1, 1, 1, 1)
        xd = x.double()
        x0 = posterior_x0(xd, tt, mu, self.sigma)
        var = (1 - tt) ** 2 * S**2 + tt**2 * self.sigma**2
        k = (tt * self.sigma**2 - (1 - tt) * S**2) / var  # E[v | x_t] = -mu + k (x_t - (1-t) mu)
        v = -mu + k * (xd - (1 - tt) * mu)
        n = xd + (1 - tt) * v
        out = {"x": x0, "v": v, "eps": n / self.sigma}[self.prediction]
        return out.to(x.dtype)

    def null_condition(self, y):
        return {"y": torch.full_like(y, NULL)}


def standard_noise(y, seed=0):
    """Noise whose every (class, channel) group has mean exactly 0 and std exactly 1."""
    z = torch.randn(
        len(y), *SHAPE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64
    )
    for cls in (0, 1):
        grp = z[y == cls]
        z[y == cls] = (grp - grp.mean(dim=(0, 2, 3), keepdim=True)) / grp.std(
            dim=(0, 2, 3), unbiased=False, keepdim=True
        )
    return z


def class_stats(x, y):
    out = {}
    for cls in (0, 1):
        v = x[y == cls].double()
        out[cls] = (v.mean().item(), v.std(unbiased=False).item())
    return out


# ---------------------------------------------------------------------------- conversions


@pytest.mark.parametrize("sigma", [1.0, 2.0])
def test_conversions_are_exact_in_float64(sigma):
    """From any space to any other, the truth maps to the truth to float64 rounding (t away from
    the clipped ends), and a round trip returns the input."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(16, *SHAPE, generator=g, dtype=torch.float64)
    eps = torch.randn(16, *SHAPE, generator=g, dtype=torch.float64)
    t = torch.linspace(T_EPS, 1 - T_EPS, 16, dtype=torch.float64)
    tt = t.view(-1, 1, 1, 1)
    x_t = (1 - tt) * x0 + tt * sigma * eps
    truth = {"v": sigma * eps - x0, "x": x0, "eps": eps}
    for a in SPACES:
        for b in SPACES:
            out = convert(truth[a], x_t, t, a, b, sigma, T_EPS)
            torch.testing.assert_close(out, truth[b], atol=1e-12, rtol=0)
            back = convert(out, x_t, t, b, a, sigma, T_EPS)
            torch.testing.assert_close(back, truth[a], atol=1e-12, rtol=0)


def test_clipped_conversions_divide_by_t_eps():
    """Below t_eps (x) and above 1 - t_eps (eps) the divisor is t_eps (JiT's clamp_min)."""
    x_t = torch.full((2, 1, 1, 1), 0.3, dtype=torch.float64)
    pred = torch.full((2, 1, 1, 1), 0.1, dtype=torch.float64)
    t = torch.tensor([0.01, 0.5], dtype=torch.float64)
    v = convert(pred, x_t, t, "x", "v", 1.0, T_EPS).flatten()
    assert v.tolist() == pytest.approx([0.2 / 0.05, 0.2 / 0.5], abs=1e-12)
    t = torch.tensor([0.99, 0.5], dtype=torch.float64)
    v = convert(pred, x_t, t, "eps", "v", 2.0, T_EPS).flatten()  # (2 * 0.1 - 0.3) / max(1 - t, .05)
    assert v.tolist() == pytest.approx([-0.1 / 0.05, -0.1 / 0.5], abs=1e-12)


# ---------------------------------------------------------------------------- training losses


def test_jit_loss_is_the_reference_formula():
    """prediction=x, loss_space=v: mean(((x_t - x_pred) - (x_t - x_0))^2) / max(t, t_eps)^2
    (LTH14/JiT denoiser.py); with x_pred = 0 that is mean(x_0^2) / max(t, t_eps)^2."""
    flow = RectifiedFlow(prediction="x", loss_space="v", t_eps=T_EPS)
    x0 = torch.arange(2 * 8, dtype=torch.float32).view(2, 2, 2, 2) / 8

    def zero_model(x, t, y):
        return torch.zeros_like(x)

    zero_model.condition_keys = ("y",)
    t = torch.tensor([0.01, 0.5])
    out = flow.training_losses(
        zero_model, {"x": x0, "y": torch.zeros(2)}, t=t, noise=torch.ones_like(x0)
    )
    expected = (x0**2).mean(dim=(1, 2, 3)) / torch.tensor([0.05, 0.5]) ** 2
    torch.testing.assert_close(out["loss"], expected, rtol=1e-6, atol=0)


def loss_coefficient(p, space, t, sigma):
    """d(loss-space value) / d(prediction) of the clipped conversion p -> space at t."""
    ct, c1 = max(t, T_EPS), max(1 - t, T_EPS)
    table = {
        ("x", "v"): -1 / ct,
        ("x", "eps"): -(1 - t) / (ct * sigma),
        ("eps", "v"): sigma / c1,
        ("eps", "x"): -t * sigma / c1,
        ("v", "x"): -t,
        ("v", "eps"): (1 - t) / sigma,
    }
    return 1.0 if p == space else table[(p, space)]


@pytest.mark.parametrize("sigma", [1.0, 2.0])
@pytest.mark.parametrize("loss_space", SPACES)
@pytest.mark.parametrize("prediction", SPACES)
def test_optimal_model_loss_is_the_conditional_variance(prediction, loss_space, sigma):
    """With the optimal network, the per-element loss is c^2 Var(p | x_t): c the clipped
    conversion's coefficient, Var the closed-form conditional variance of the prediction space.
    A wrong target (or wrong noise scale) would add a bias term and fail this."""
    torch.manual_seed(1)
    flow = RectifiedFlow(prediction=prediction, loss_space=loss_space, noise_scale=sigma)
    model = GaussianPredictor(prediction, sigma)
    n = 2048
    y = torch.arange(n) % 2
    x0 = MEANS[y].view(-1, 1, 1, 1) + S * torch.randn(n, *SHAPE, dtype=torch.float64)
    for t in (0.02, 0.3, 0.7, 0.99):
        out = flow.training_losses(
            model, {"x": x0, "y": y}, t=torch.full((n,), t, dtype=torch.float64)
        )
        var_t = (1 - t) ** 2 * S**2 + t**2 * sigma**2
        cond_var = {
            "x": S**2 * t**2 * sigma**2 / var_t,
            "v": S**2 * sigma**2 / var_t,
            "eps": S**2 * (1 - t) ** 2 / var_t,
        }[prediction]
        expected = loss_coefficient(prediction, loss_space, t, sigma) ** 2 * cond_var
        # 131k squared Gaussians: the mean's relative Monte-Carlo error is sqrt(2 / 131072) = 0.4%.
        assert out["loss"].mean().item() == pytest.approx(expected, rel=0.02), t


# ---------------------------------------------------------------------------- sampling


def scalar_recursion(flow, steps, sampler, prediction, w, sigma, t_eps=T_EPS):
    """Independent closed form of the sampler on the Gaussian data: per class the state is
    alpha z + beta mu (z the unit noise). The optimal network's velocity after the clipped
    conversion is f(t) * (a(t) x + b(t) mu): a = k, b = -1 - k (1 - t), with f = 1 (v),
    t / max(t, t_eps) (x), (1 - t) / max(1 - t, t_eps) (eps). Guidance scales mu by w."""

    def vel(alpha, beta, t):
        var = (1 - t) ** 2 * S**2 + t**2 * sigma**2
        k = (t * sigma**2 - (1 - t) * S**2) / var
        f = {"v": 1.0, "x": t / max(t, t_eps), "eps": (1 - t) / max(1 - t, t_eps)}[prediction]
        return f * k * alpha, f * (k * beta + (-1 - k * (1 - t)) * w)

    grid = flow.time_grid(steps, *SHAPE[1:])
    alpha, beta = sigma, 0.0
    for i, (t, t_next) in enumerate(zip(grid[:-1], grid[1:])):
        dt = t_next - t
        da, db = vel(alpha, beta, t)
        last = i == len(grid) - 2
        if sampler == "euler" or (last and prediction == "x"):
            alpha, beta = alpha + dt * da, beta + dt * db
            continue
        da2, db2 = vel(alpha + dt * da, beta + dt * db, t_next)
        alpha, beta = alpha + dt * (da + da2) / 2, beta + dt * (db + db2) / 2
    return alpha, beta


# Worst deviation from the true N(w mu, S^2) of the scalar recursion over w in {1, 1.5} and
# sigma in {1, 2}: (mean, relative std), per (t_eps, sampler, prediction). The v rows are today's
# samplers (euler 100: -2.1% std at sigma = 2; heun 25: +0.3%). With a small t_eps nothing is
# clipped on the grid and x-prediction is today's Euler exactly, and Heun but for its last step
# (Euler, as JiT): 1.0%. JiT's t_eps = 0.05 clips the steps below t = 0.05, which leave part of
# the last noise in: about 3% under Euler 100, 2% under Heun 25. Eps prediction is blind at t = 1
# (x_1 = noise says nothing of x_0), so its first step stands still: 1-3% whatever t_eps.
BOUNDS = {
    (0.05, "euler", "v"): (1e-3, 0.022),
    (0.05, "euler", "x"): (0.031, 0.035),
    (0.05, "euler", "eps"): (0.024, 0.017),
    (0.05, "heun", "v"): (1e-3, 0.003),
    (0.05, "heun", "x"): (0.019, 0.015),
    (0.05, "heun", "eps"): (0.022, 0.032),
    (0.001, "euler", "v"): (1e-3, 0.022),
    (0.001, "euler", "x"): (1e-3, 0.022),
    (0.001, "euler", "eps"): (0.008, 0.012),
    (0.001, "heun", "v"): (1e-3, 0.003),
    (0.001, "heun", "x"): (1e-3, 0.011),
    (0.001, "heun", "eps"): (0.015, 0.023),
}


@pytest.mark.parametrize("t_eps", [0.05, 0.001])
@pytest.mark.parametrize("sigma", [1.0, 2.0])
@pytest.mark.parametrize("w", [1.0, 1.5])
@pytest.mark.parametrize("prediction", SPACES)
@pytest.mark.parametrize("sampler,steps", [("euler", 100), ("heun", 25)])
def test_every_prediction_samples_the_gaussian(sampler, steps, prediction, w, sigma, t_eps):
    """The samplers on the optimal network of each prediction space match the scalar closed
    form to float32 rounding, and that closed form is within BOUNDS of the true distribution."""
    flow = RectifiedFlow(prediction=prediction, noise_scale=sigma, t_eps=t_eps)
    model = GaussianPredictor(prediction, sigma)
    y = torch.arange(128) % 2
    x = flow.sample(
        model, standard_noise(y).float(), {"y": y}, sampler=sampler, steps=steps, cfg_scale=w
    )
    alpha, beta = scalar_recursion(flow, steps, sampler, prediction, w, sigma, t_eps)
    mean_bound, std_bound = BOUNDS[(t_eps, sampler, prediction)]
    for cls, (mean, std) in class_stats(x, y).items():
        mu = MEANS[cls].item()
        assert mean == pytest.approx(beta * mu, abs=2e-4)
        assert std == pytest.approx(abs(alpha), rel=2e-4)
        assert beta * mu == pytest.approx(w * mu, abs=mean_bound)
        assert abs(alpha) == pytest.approx(S, rel=std_bound)


def test_x_prediction_heun_ends_with_an_euler_step():
    """JiT's sampler: Heun everywhere but the last step (its corrector would sit at t = 0)."""
    model = GaussianPredictor("x")
    y = torch.arange(4) % 2
    RectifiedFlow(prediction="x").sample(
        model, standard_noise(y).float(), {"y": y}, sampler="heun", steps=10
    )
    assert model.calls == 2 * 10 - 1
    model = GaussianPredictor("v")
    RectifiedFlow().sample(model, standard_noise(y).float(), {"y": y}, sampler="heun", steps=10)
    assert model.calls == 2 * 10


def test_bad_spaces_and_scales_are_refused():
    with pytest.raises(ValueError, match="prediction 'x0'.*v, x, eps"):
        RectifiedFlow(prediction="x0")
    with pytest.raises(ValueError, match="loss_space"):
        RectifiedFlow(loss_space="score")
    with pytest.raises(ValueError, match="noise_scale"):
        RectifiedFlow(noise_scale=0.0)
    with pytest.raises(ValueError, match="loss_space=v"):
        RectifiedFlow(loss_space="x", cosine_loss_weight=1.0)


def test_sde_with_a_noise_scale_recovers_the_gaussian():
    """The SDE's score term uses the scaled noise (-E[n | x_t] / (t sigma^2)): with sigma = 2 and
    x-prediction, Euler-Maruyama 250 still gives N(mu_y, S^2) up to Monte-Carlo error."""
    torch.manual_seed(3)
    y = torch.arange(2048) % 2
    flow = RectifiedFlow(prediction="x", noise_scale=2.0, t_eps=0.001)
    x = flow.sample(
        GaussianPredictor("x", 2.0), torch.randn(len(y), *SHAPE), {"y": y}, sampler="sde"
    )
    # 65k values per class: Monte-Carlo standard errors 0.002 (mean) and 0.3% (std).
    for cls, (mean, std) in class_stats(x, y).items():
        assert mean == pytest.approx(MEANS[cls].item(), abs=0.01)
        assert std == pytest.approx(S, rel=0.015)
