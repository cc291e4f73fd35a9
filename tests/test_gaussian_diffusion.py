"""GaussianDiffusion against the reference DiT numbers (tests/fixtures/dit_reference_tiny.pt,
see tests/fixtures/README.md) and against closed-form facts of DDPM / DDIM."""

import math
from pathlib import Path

import pytest
import torch

from ditkit.models import DiT
from ditkit.objectives import GaussianDiffusion
from ditkit.objectives.schedule import beta_schedule, space_timesteps

FIXTURE = Path(__file__).parent / "fixtures" / "dit_reference_tiny.pt"
# The fixture holds the reference's float32 results, with its own float32 rounding (1/sqrt(abar)
# amplifies it up to ~150x at t = 999: 7.6e-5 in pred_xstart). Our model runs in float64 (below), so
# our side is the same on any CPU and the difference is that fixed error: at most 0.55 of TOL,
# measured. In float32 the model's matmuls round differently on AMX, AVX-512 and AVX2 CPUs, and the
# reference itself moves by up to 2e-4 between them (tests/fixtures/README.md).
TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Many small ops: one intra-op thread is as fast on an idle machine and far faster on a busy one."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def ref():
    return torch.load(FIXTURE, weights_only=True)


class Float64(torch.nn.Module):
    """The fixture's DiT in float64: inputs cast up, the output rounded once to float32 (what the
    objective computes in)."""

    condition_keys = ("y",)

    def __init__(self, model):
        super().__init__()
        self.model = model.double()

    def forward(self, x, t, y):
        return self.model(x.double(), t.double(), y).float()

    def null_condition(self, y):
        return self.model.null_condition(y)


@pytest.fixture(scope="module")
def model(ref):
    m = DiT(**ref["model_config"])
    m.load_state_dict(ref["state_dict"])
    return Float64(m.eval()).eval()


class Recorder(torch.nn.Module):
    """Wraps a model and records the timesteps it is called with."""

    condition_keys = ("y",)

    def __init__(self, model):
        super().__init__()
        self.model, self.timesteps = model, []

    def forward(self, x, t, y):
        self.timesteps.append(t.clone())
        return self.model(x, t, y)


# ---------------------------------------------------------------- reference fixture


def test_training_losses_match_reference(ref, model):
    inp, out = ref["inputs"], ref["outputs"]
    d = GaussianDiffusion(
        num_timesteps=ref["diffusion"]["steps"], schedule="linear", learn_sigma=True
    )
    with torch.no_grad():
        terms = d.training_losses(
            model, {"x": inp["x_start"], "y": inp["y"]}, inp["loss_t"], inp["noise"]
        )
    # loss_t includes t = 0 (the discretised decoder NLL) and t = 999.
    torch.testing.assert_close(terms["mse"], out["train_mse"], **TOL)
    torch.testing.assert_close(terms["vb"], out["train_vb"], **TOL)
    torch.testing.assert_close(terms["loss"], out["train_loss"], **TOL)
    torch.testing.assert_close(
        d.q_sample(inp["x_start"], inp["loss_t"], inp["noise"]), out["q_sample"], **TOL
    )


def test_respaced_p_mean_variance_matches_reference(ref, model):
    inp, out = ref["inputs"], ref["outputs"]
    spaced = GaussianDiffusion().respace(ref["diffusion"]["respacing"])
    assert spaced.timestep_map == ref["diffusion"]["respaced_timesteps"]
    rec = Recorder(model)
    with torch.no_grad():
        p = spaced.p_mean_variance(
            rec, inp["x"], inp["respaced_t"], {"y": inp["y"]}, clip_denoised=False
        )
    torch.testing.assert_close(p["mean"], out["respaced_mean"], **TOL)
    torch.testing.assert_close(p["log_variance"], out["respaced_log_variance"], **TOL)
    torch.testing.assert_close(p["pred_xstart"], out["respaced_pred_xstart"], **TOL)
    torch.testing.assert_close(p["variance"], out["respaced_log_variance"].exp(), **TOL)
    # The model saw the ORIGINAL timesteps of respaced indices [0, 3, 125, 249].
    assert rec.timesteps[0].tolist() == [0.0, 12.0, 502.0, 999.0]


def test_ddim_sample_matches_reference(ref, model):
    inp, out = ref["inputs"], ref["outputs"]
    d = GaussianDiffusion()
    rec = Recorder(model)
    x = d.respace(ref["diffusion"]["ddim_respacing"]).ddim_sample(
        rec, inp["x_T"], {"y": inp["y"]}, eta=0.0
    )
    torch.testing.assert_close(x, out["ddim_sample"], atol=1e-5, rtol=1e-5)
    assert [int(t[0]) for t in rec.timesteps] == list(range(900, -1, -100))
    # The same through the single entry point.
    y = d.sample(model, inp["x_T"], {"y": inp["y"]}, sampler="ddim", steps=10)
    torch.testing.assert_close(y, out["ddim_sample"], atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- schedules and respacing


def test_linear_and_cosine_schedules():
    lin = beta_schedule("linear", 1000)
    assert lin[0].item() == pytest.approx(1e-4) and lin[-1].item() == pytest.approx(0.02)
    assert beta_schedule("linear", 250)[0].item() == pytest.approx(4e-4)  # rescaled for T != 1000
    d = GaussianDiffusion(schedule="cosine")
    # Nichol & Dhariwal eq. 17: abar_t = f(t) / f(0), f(t) = cos^2((t/T + s)/(1 + s) pi/2).
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    for t in (0, 10, 500, 900):
        assert d.alphas_cumprod[t].item() == pytest.approx(f((t + 1) / 1000) / f(0), rel=1e-9)
    assert d.betas.max().item() == pytest.approx(0.999)  # clipped near t = T
    with pytest.raises(ValueError, match="linear, cosine"):
        GaussianDiffusion(schedule="quadratic")


def test_space_timesteps_specs():
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    assert space_timesteps(1000, "10,10,5") == (
        [0, 37, 74, 111, 148, 185, 222, 259, 296, 333]
        + [334 + i for i in (0, 37, 74, 111, 148, 184, 221, 258, 295, 332)]
        + [667, 750, 833, 916, 999]
    )
    assert space_timesteps(1000, 1000) == list(range(1000))
    for bad, msg in [
        ("ddim400", "no integer stride"),
        ("2000", "cannot keep"),
        ("fast", "expected"),
        ("ddimx", "integer N"),
    ]:
        with pytest.raises(ValueError, match=msg):
            space_timesteps(1000, bad)


def test_respaced_process_keeps_alpha_bar_at_kept_steps():
    """improved DDPM sec. 4: the respaced process has the original abar at every kept step."""
    d = GaussianDiffusion()
    s = d.respace("10,10,5")
    assert s.num_timesteps == 25 and d.num_timesteps == 1000
    torch.testing.assert_close(
        s.alphas_cumprod, d.alphas_cumprod[s.timestep_map], rtol=1e-12, atol=0
    )
    assert d.respace("10,10,5") is s  # cached: evaluation calls sample() once per batch


# ---------------------------------------------------------------- losses


def test_training_draws_t_then_noise_from_the_global_rng():
    """The training loop seeds the global RNG per step; losses must be a function of that seed."""
    d = GaussianDiffusion(learn_sigma=False)
    x0 = torch.randn(3, 4, 8, 8)
    model = lambda x, t, y=None: x * 0.5 + t.view(-1, 1, 1, 1) / 1000  # noqa: E731
    torch.manual_seed(7)
    drawn = d.training_losses(model, {"x": x0})["loss"]
    torch.manual_seed(7)
    t = torch.randint(0, 1000, (3,))
    noise = torch.randn_like(x0)
    torch.testing.assert_close(
        drawn, d.training_losses(model, {"x": x0}, t, noise)["loss"], rtol=0, atol=0
    )


def test_vlb_trains_only_the_variance_and_mse_only_the_mean():
    d = GaussianDiffusion(learn_sigma=True)
    x0, noise = torch.randn(4, 2, 4, 4), torch.randn(4, 2, 4, 4)
    out = torch.nn.Parameter(torch.randn(4, 4, 4, 4) * 0.1)
    t = torch.tensor([0, 5, 400, 999])
    terms = d.training_losses(lambda x, tt, y=None: out, {"x": x0}, t, noise)
    (g_vb,) = torch.autograd.grad(terms["vb"].sum(), out, retain_graph=True)
    (g_mse,) = torch.autograd.grad(terms["mse"].sum(), out)
    assert g_vb[:, :2].abs().max() == 0 and g_vb[:, 2:].abs().max() > 0
    assert g_mse[:, 2:].abs().max() == 0 and g_mse[:, :2].abs().max() > 0
    # mse is the plain eps regression: mean over C, H, W of (noise - out)^2.
    torch.testing.assert_close(terms["mse"], ((noise - out[:, :2]) ** 2).mean(dim=(1, 2, 3)))


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_a_model_predicting_the_target_has_zero_loss(prediction):
    d = GaussianDiffusion(learn_sigma=False, prediction=prediction)
    x0, noise = torch.randn(4, 2, 4, 4), torch.randn(4, 2, 4, 4)
    t = torch.tensor([0, 100, 500, 999])
    abar = d.alphas_cumprod[t].view(-1, 1, 1, 1).float()
    # v = sqrt(abar) eps - sqrt(1 - abar) x0 (Salimans & Ho 2022, sec. 4).
    target = {"eps": noise, "x0": x0, "v": abar.sqrt() * noise - (1 - abar).sqrt() * x0}[prediction]
    terms = d.training_losses(lambda x, tt, y=None: target, {"x": x0}, t, noise)
    assert terms["loss"].abs().max() < 1e-10
    # ... and its x0 estimate from x_t is x0 itself.
    x_t = d.q_sample(x0, t, noise)
    p = d.p_mean_variance(lambda x, tt, y=None: target, x_t, t, {"y": None})
    torch.testing.assert_close(
        p["pred_xstart"], x0, atol=2e-3, rtol=0
    )  # x0 from eps at t=999 divides by 0.006


def test_clip_denoised_clamps_x0_before_the_posterior_mean():
    d = GaussianDiffusion(learn_sigma=False, prediction="x0")
    x_t, t = torch.randn(2, 1, 2, 2), torch.tensor([10, 500])
    x0 = torch.tensor([3.0, -3.0]).view(2, 1, 1, 1).expand(2, 1, 2, 2)
    p = d.p_mean_variance(lambda x, tt, y=None: x0, x_t, t, {"y": None}, clip_denoised=True)
    assert p["pred_xstart"].tolist() == [[[[1.0, 1.0], [1.0, 1.0]]], [[[-1.0, -1.0], [-1.0, -1.0]]]]
    mean, _, _ = d.q_posterior_mean_variance(p["pred_xstart"], x_t, t)
    torch.testing.assert_close(p["mean"], mean)


# ---------------------------------------------------------------- samplers


def test_ddim_eta_one_is_ancestral_sampling_with_posterior_variance(ref, model):
    """Song et al. 2021 sec. 4.1: DDIM with eta = 1 is DDPM with sigma_t^2 = the posterior
    variance; both draw one normal per step, so a seed gives the same samples."""
    d = GaussianDiffusion(learn_sigma=False, fixed_variance="small")
    eps_only = lambda x, t, y: model(x, t, y)[:, :4]  # noqa: E731
    x_T, y = ref["inputs"]["x_T"], ref["inputs"]["y"]
    torch.manual_seed(3)
    a = d.sample(eps_only, x_T, {"y": y}, sampler="ddim", steps="20", eta=1.0)
    torch.manual_seed(3)
    b = d.sample(eps_only, x_T, {"y": y}, sampler="ddpm", steps=20)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert (a - x_T).abs().mean() > 0.1


class Doubler(torch.nn.Module):
    """A stand-in backbone: learned-sigma layout (2C channels), class labels, null class 1."""

    condition_keys = ("y",)

    def forward(self, x, t, y=None):
        return torch.cat([x, x], 1)

    def null_condition(self, y):
        return {"y": torch.full_like(y, 1)}


def test_sampler_and_option_errors_are_clear():
    d, model = GaussianDiffusion(), Doubler()
    x = torch.randn(2, 4, 4, 4)
    with pytest.raises(ValueError, match="sampler=ddpm, ddim"):
        d.sample(model, x, {"y": torch.zeros(2, dtype=torch.long)}, sampler="euler", steps=10)
    with pytest.raises(ValueError, match=r"sampler=ddpm has no option \['eta'\]"):
        d.sample(model, x, sampler="ddpm", steps=10, eta=0.5)
    with pytest.raises(ValueError, match=r"model_kwargs lacks \['y'\]"):
        d.sample(model, x, sampler="ddim", steps=10, cfg_scale=4.0)
    with pytest.raises(ValueError, match="expects 8 output channels"):
        d.sample(lambda x, t: x, x, sampler="ddim", steps=10)
    with pytest.raises(ValueError, match="eps, x0, v"):
        GaussianDiffusion(prediction="score")
    y = {"y": torch.zeros(2, dtype=torch.long)}
    with pytest.raises(ValueError, match="exceeds the 4 prediction channels"):
        d.sample(model, x, y, sampler="ddim", steps=10, cfg_scale=2.0, guidance_channels=5)
    with pytest.raises(ValueError, match="low <= high"):
        d.sample(model, x, y, sampler="ddim", steps=10, cfg_scale=2.0, guidance_interval=(700, 100))
    # Guidance needs the model's null condition (the Backbone contract).
    with pytest.raises(ValueError, match="null_condition"):
        d.sample(lambda x, t, y: torch.cat([x, x], 1), x, y, sampler="ddim", cfg_scale=2.0)
