"""The diffusers solvers (src/ditkit/objectives/solvers.py) on the closed-form Gaussian data of
test_samplers_closed_form.py.

On that data the optimal data prediction is affine: on the centred variable u = x - a mu,
D(x) - mu = u a S^2 / V with V = a^2 S^2 + b^2 (DDPM: a^2 = abar, b^2 = 1 - abar; flow: a = 1 - t,
b = t). Each solver step is then a scalar map of u, and its std factor follows from the paper's
update rule in a few lines of float64, written here from the papers, independently of diffusers:
- DPM-Solver++(2M), Lu et al. 2022b, Alg. 2: x' = (b'/b) x - a' (e^{-h} - 1) D, with
  D = (1 + 1/(2r)) D_i - 1/(2r) D_{i-1}, r = h_{i-1} / h_i, h = lambda' - lambda, lambda = log(a/b);
  first order at the first and at the last step (to b = 0).
- UniPC with order 1, Zhao et al. 2023, UniP-1 + UniC-1 with B(h) = e^h - 1 ("bh2"): the predictor is
  the first-order step above; the corrector, with the model at the predicted point, replaces D_i by
  (D_i + D(x_pred)) / 2, a trapezoidal rule that reuses that model call for the next step.
With exactly standardised noise the samples' statistics carry no Monte-Carlo error, so the samplers
must reproduce those factors to float32 rounding.
"""

import math

import pytest
import torch
from test_samplers_closed_form import (
    MEANS,
    SHAPE,
    GaussianDenoiser,
    VelocityField,
    class_stats,
    compose_cfg,
    ddpm_prior,
    labels,
    standard_noise,
    target,
)
from test_samplers_closed_form import S as DATA_STD

from ditkit.objectives import GaussianDiffusion, RectifiedFlow, get_sampler
from ditkit.objectives.solvers import ddpm_scheduler


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def centred_prediction(u, a, b):
    return u * a * DATA_STD**2 / (a * a * DATA_STD**2 + b * b)


def dpmpp_2m_factor(ab):
    """Std factor over S of DPM-Solver++(2M) through the (a, b) points `ab` (the last (1, 0))."""
    a, b = ab[0]
    f = math.sqrt(a * a * DATA_STD**2 + b * b)  # x_T's std about its mean
    prev_m = prev_h = None
    for (a, b), (a2, b2) in zip(ab[:-1], ab[1:]):
        m = centred_prediction(f, a, b)
        if b2 == 0:
            return m / DATA_STD  # the last step, first order: x_0 = D
        h = math.log(a2 / b2) - math.log(a / b)
        d = m if prev_m is None else (1 + 0.5 * h / prev_h) * m - 0.5 * h / prev_h * prev_m
        f = b2 / b * f - a2 * math.expm1(-h) * d
        prev_m, prev_h = m, h
    raise AssertionError("the grid must end at b = 0")


def unipc_1_factor(ab):
    """Std factor over S of UniPC with order 1 (UniP-1 + UniC-1, bh2) through `ab`."""
    a, b = ab[0]
    f = math.sqrt(a * a * DATA_STD**2 + b * b)
    m = centred_prediction(f, a, b)
    for (a, b), (a2, b2) in zip(ab[:-1], ab[1:]):
        if b2 == 0:
            return m / DATA_STD  # predictor to b = 0 gives D at the last predicted point
        phi = a * b2 / (b * a2) - 1  # e^{-h} - 1, finite at a = 0 (flow's t = 1)
        predicted = b2 / b * f - a2 * phi * m
        m_next = centred_prediction(predicted, a2, b2)
        f = predicted - a2 * phi * 0.5 * (m_next - m)
        m = m_next
    raise AssertionError("the grid must end at b = 0")


def ddpm_points(d, name, steps):
    """(a, b) at the timesteps diffusers visits, from ditkit's own alphas_cumprod, then (1, 0)."""
    abar = d.alphas_cumprod
    ts = [int(t) for t in ddpm_scheduler(d, name, steps).timesteps]
    return [(abar[t].sqrt().item(), (1 - abar[t]).sqrt().item()) for t in ts] + [(1.0, 0.0)]


def run_ddpm(sampler, steps, w, prediction="eps", n=128, **options):
    d = GaussianDiffusion(learn_sigma=prediction == "eps", prediction=prediction)
    model = GaussianDenoiser(d, learn_sigma=d.learn_sigma, prediction=prediction)
    y = labels(n)
    x_T = ddpm_prior(d, y, target(y, w), standard_noise(y))
    x = d.sample(model, x_T, {"y": y}, sampler=sampler, steps=steps, cfg_scale=w, **options)
    return d, model, y, x


@pytest.mark.parametrize("steps", [10, 20])
@pytest.mark.parametrize("w", [1.0, 1.5])
def test_dpmpp_2m_is_dpm_solver_pp_on_ditkit_schedule(steps, w):
    """Learned-sigma model (2C outputs): the solver reads the eps channels only; guided halves go
    as one batch of 2N; mean kept exactly, std equal to Alg. 2's factor."""
    d, model, y, x = run_ddpm("dpmpp_2m", steps, w)
    factor = dpmpp_2m_factor(ddpm_points(d, "dpmpp_2m", steps))
    assert 0.5 < factor < 1.0
    for cls, (mean, std) in class_stats(x, y, slice(0, 4)).items():
        assert mean == pytest.approx(w * MEANS[cls].item(), abs=2e-4)
        # float32 steps: the first divides by a = sqrt(abar_999) (158x); 2e-4 as for DDIM-50
        assert std == pytest.approx(DATA_STD * factor, rel=2e-4)
    assert len(model.calls) == steps
    assert {n for n, _ in model.calls} == {len(y) * (2 if w != 1.0 else 1)}
    assert model.calls[0][1] == 999.0  # the model sees original timesteps


def test_dpmpp_2m_is_more_accurate_than_ddim_at_equal_calls():
    """At 20 calls DPM-Solver++(2M)'s std error is a third of DDIM's (-4.6 % vs -13.3 %)."""
    d = GaussianDiffusion(learn_sigma=False)
    dpm = 1 - dpmpp_2m_factor(ddpm_points(d, "dpmpp_2m", 20))
    _, _, y, x = run_ddpm("ddim", 20, 1.0, n=16)
    ddim = 1 - class_stats(x, y)[1][1] / DATA_STD
    assert dpm == pytest.approx(0.046, abs=0.002) and ddim == pytest.approx(0.133, abs=0.002)


@pytest.mark.parametrize("w", [1.0, 2.0])
def test_unipc_order_1_is_the_trapezoidal_exponential_integrator(w):
    d, model, y, x = run_ddpm("unipc", 10, w, order=1)
    factor = unipc_1_factor(ddpm_points(d, "unipc", 10))
    for cls, (mean, std) in class_stats(x, y, slice(0, 4)).items():
        assert mean == pytest.approx(w * MEANS[cls].item(), abs=2e-4)
        assert std == pytest.approx(DATA_STD * factor, rel=2e-4)
    assert len(model.calls) == 10  # the corrector reuses the next step's call


def test_unipc_converges_at_second_order_or_better():
    """UniPC-bh2 with order 2: doubling the calls divides the std error by 4 or more (measured:
    20 -> 40 calls x6.8, 40 -> 80 x4.8), and 40 calls are within 1 %."""
    errors = []
    for steps in (20, 40, 80):
        _, _, y, x = run_ddpm("unipc", steps, 1.0, n=16)
        errors.append(abs(class_stats(x, y)[1][1] / DATA_STD - 1))
    assert errors[1] < 0.01
    assert errors[0] / errors[1] > 4 and errors[1] / errors[2] > 4


def test_solvers_give_the_same_samples_for_eps_x0_and_v_models():
    """The prediction type maps to diffusers' (epsilon, sample, v_prediction): one optimal model in
    three parametrisations gives one output (float32 conversions: 1e-4 as in the DDIM test)."""
    outs = [run_ddpm("dpmpp_2m", 10, 1.0, prediction=p, n=8)[3] for p in ("eps", "x0", "v")]
    torch.testing.assert_close(outs[1], outs[0], atol=1e-4, rtol=0)
    torch.testing.assert_close(outs[2], outs[0], atol=1e-4, rtol=0)


def run_flow(steps, w=1.0, shift=1.0, n=128, **options):
    flow, model, y = RectifiedFlow(shift=shift), VelocityField(), labels(n)
    x = flow.sample(
        model, standard_noise(y).float(), {"y": y}, sampler="unipc_flow", steps=steps,
        cfg_scale=w, **options,
    )  # fmt: skip
    return flow, model, y, x


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_unipc_flow_order_1_on_ditkit_time_grid(shift):
    """On the flow ODE (a = 1 - t, b = t) along ditkit's shifted grid, guided."""
    flow, model, y, x = run_flow(8, w=1.5, shift=shift, order=1)
    grid = flow.time_grid(8, *SHAPE[1:])
    factor = unipc_1_factor([(1 - t, t) for t in grid])
    for cls, (mean, std) in class_stats(x, y, slice(0, 4)).items():
        assert mean == pytest.approx(1.5 * MEANS[cls].item(), abs=2e-4)
        # diffusers starts at t = 1 - 1e-6 instead of 1: a 1e-6 effect
        assert std == pytest.approx(DATA_STD * factor, rel=2e-4)
    assert [round(t, 6) for _, t in model.calls] == [round(t, 6) for t in grid[:-1]]


def test_unipc_flow_converges_at_second_order():
    """order 2: 20 -> 40 -> 80 calls divide the std error by 3.5 and 4.1 (0.80 %, 0.23 %, 0.055 %)."""
    errors = []
    for steps in (20, 40, 80):
        _, _, y, x = run_flow(steps, n=16)
        errors.append(abs(class_stats(x, y)[1][1] / DATA_STD - 1))
    assert errors[0] < 0.01
    assert errors[0] / errors[1] == pytest.approx(3.5, rel=0.1)
    assert errors[1] / errors[2] == pytest.approx(4.0, rel=0.1)


@pytest.mark.parametrize(
    "name,objective,steps",
    [("dpmpp_2m", "ddpm", 20), ("unipc", "ddpm", 20), ("unipc_flow", "flow", 20)],
)
def test_solver_configs_and_errors(name, objective, steps):
    cfg = compose_cfg(objective, name)
    assert (cfg.sampler.name, cfg.sampler.steps) == (name, steps)
    assert get_sampler(name).objective == objective
    other = GaussianDiffusion() if objective == "flow" else RectifiedFlow()
    with pytest.raises(ValueError, match=f"belongs to objective={objective}"):
        other.check_sampler(name)
    obj = GaussianDiffusion() if objective == "ddpm" else RectifiedFlow()
    model = GaussianDenoiser(obj, True) if objective == "ddpm" else VelocityField()
    x_T = torch.zeros(2, *SHAPE)
    with pytest.raises(ValueError, match=f"sampler={name} takes an integer number of steps"):
        obj.sample(model, x_T, {"y": labels(2)}, sampler=name, steps="ddim20")
    if name != "dpmpp_2m":
        with pytest.raises(ValueError, match="order must be 1, 2 or 3"):
            obj.sample(model, x_T, {"y": labels(2)}, sampler=name, steps=4, order=5)
