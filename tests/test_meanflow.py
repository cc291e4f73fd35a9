"""MeanFlow (objective=meanflow): the JVP target, the (r, t) draws, guidance folded into the target,
the adaptive weight, the one- and two-step samplers, the attention fallback, the DiT's second time."""

import pytest
import torch
from torch import nn

from ditkit.models import DiT, JiT
from ditkit.models.flops import count_flops
from ditkit.objectives import MeanFlow
from ditkit.objectives.samplers import get_sampler, resolve

TS = 1.0  # MeanFlow's default time_scale (the reference's t in [0, 1])


class GaussianOracle(nn.Module):
    """The exact average velocity of rectified flow on data N(mu, s^2) per coordinate.

    z_t = (1 - t) x + t eps is Gaussian with mean m_t = (1 - t) mu and std sig_t = sqrt((1 - t)^2 s^2
    + t^2); the probability-flow ODE is the affine map z_r = m_r + sig_r / sig_t (z_t - m_t), so
    u(z, r, t) = (z - z_r) / (t - r), and at r = t the velocity v = -mu + sig_t' / sig_t (z - m_t)."""

    condition_keys = ("y",)
    second_time = True
    guidance_input = False
    num_classes = 10

    def __init__(self, mu: float, s: float):
        super().__init__()
        self.mu, self.s = mu, s

    def sig(self, t):
        return ((1 - t) ** 2 * self.s**2 + t**2).sqrt()

    def velocity(self, z, t):
        t = t.view(-1, 1, 1, 1)
        dsig = (-(1 - t) * self.s**2 + t) / self.sig(t)
        return -self.mu + dsig / self.sig(t) * (z - (1 - t) * self.mu)

    def forward(self, z, t, y, t2):
        t, r = t / TS, (t - t2) / TS  # second_time="interval": t2 = (t - r) * TS
        tb, rb = t.view(-1, 1, 1, 1), r.view(-1, 1, 1, 1)
        z_r = (1 - rb) * self.mu + self.sig(rb) / self.sig(tb) * (z - (1 - tb) * self.mu)
        gap = tb - rb
        exact = (z - z_r) / torch.where(gap > 0, gap, torch.ones_like(gap))
        return torch.where(gap > 0, exact, self.velocity(z, t))

    def null_condition(self, y):
        return {"y": torch.full_like(y, self.num_classes)}


TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2)
TINY_JIT = dict(TINY, bottleneck_dim=8, in_context_len=2, in_context_start=1)


def random_dit(backbone: str = "dit", **options) -> nn.Module:
    """A tiny DiT (or JiT) with a second time, in float64, every weight random (the zero init of
    adaLN and the output would make u identically 0 and every derivative trivial)."""
    torch.manual_seed(0)
    if backbone == "jit":
        model = JiT(**TINY_JIT, num_classes=10, second_time=True, **options)
    else:
        model = DiT(**TINY, num_classes=10, learn_sigma=False, second_time=True, **options)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.1 * torch.randn_like(p))
    return model.double()


@pytest.mark.parametrize("backbone", ["dit", "jit"])
def test_jvp_target_equals_central_finite_difference_float64(backbone):
    """du/dt from torch.func.jvp with the tangent (v, 0, 1) against the central difference
    (u(z + h v, r, t + h) - u(z - h v, r, t - h)) / 2h. In float64 with h = 1e-5 the difference's
    own error is O(h^2 |u'''|) + O(1e-16 |u| / h): measured 6e-11 against max |du/dt| = 1.3, so
    1e-8 of max |du/dt| leaves a margin of 100 and would catch a wrong tangent (errors of order 1)."""
    model = random_dit(backbone).eval()  # eval: no random label dropout between the evaluations
    obj = MeanFlow()
    g = torch.Generator().manual_seed(1)
    z = torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64)
    v = torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64)
    t = torch.tensor([0.9, 0.6, 0.3], dtype=torch.float64)
    r = torch.tensor([0.2, 0.6, 0.0], dtype=torch.float64)
    y = {"y": torch.tensor([1, 4, 7])}
    u, du_dt = obj.jvp(model, z, t, r, v, y)
    h = 1e-5
    with torch.no_grad():
        plus = obj.average_velocity(model, z + h * v, t + h, r, y)
        minus = obj.average_velocity(model, z - h * v, t - h, r, y)
    fd = (plus - minus) / (2 * h)
    # A non-trivial derivative (DiT: 1.3, JiT: 0.05; a wrong tangent or a detached t gives 0).
    assert du_dt.abs().max() > 0.01
    torch.testing.assert_close(du_dt, fd, rtol=0, atol=1e-8 * fd.abs().max().item())
    torch.testing.assert_close(u.detach(), obj.average_velocity(model, z, t, r, y))
    assert u.requires_grad and not du_dt.requires_grad  # u trains; the target is stop-gradient


def test_jvp_of_the_exact_average_velocity_satisfies_the_meanflow_identity():
    """For the closed-form u of Gaussian data and the tangent (v(z, t), 0, 1), u = v - (t - r)
    du/dt (paper eq. 6) holds exactly: float64, to 1e-9 (the oracle's own rounding)."""
    oracle, obj = GaussianOracle(mu=0.7, s=0.4), MeanFlow()
    g = torch.Generator().manual_seed(0)
    z = torch.randn(4, 1, 2, 2, generator=g, dtype=torch.float64)
    t = torch.tensor([1.0, 0.8, 0.5, 0.3], dtype=torch.float64)
    r = torch.tensor([0.0, 0.1, 0.45, 0.3], dtype=torch.float64)
    y = {"y": torch.zeros(4, dtype=torch.long)}
    v = oracle.velocity(z, t)
    u, du_dt = obj.jvp(oracle, z, t, r, v, y)
    target = v - (t - r).view(-1, 1, 1, 1) * du_dt
    torch.testing.assert_close(u, target, rtol=0, atol=1e-9)


@pytest.mark.parametrize("sampler", ["meanflow1", "meanflow2"])
def test_samplers_with_the_exact_u_map_noise_onto_the_data(sampler):
    """With the exact u the one-step (and two-step) map sends eps to mu + s eps exactly (float64):
    sampler, grid and the t2 = t - r convention all enter."""
    oracle = GaussianOracle(mu=-0.5, s=0.3).double()
    noise = torch.randn(
        64, 1, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0)
    )
    out = MeanFlow().sample(
        oracle, noise, {"y": torch.zeros(64, dtype=torch.long)}, sampler=sampler
    )
    torch.testing.assert_close(out, -0.5 + 0.3 * noise, rtol=0, atol=1e-12)
    assert (
        get_sampler(sampler, "meanflow").default_steps == {"meanflow1": 1, "meanflow2": 2}[sampler]
    )
    assert resolve(None, "meanflow", "evaluate")[0].name == "meanflow1"


class LinearU(nn.Module):
    """u = a z + b t + c t2 + e[y]: every part of the target computable by hand."""

    condition_keys = ("y",)
    second_time = True
    guidance_input = False
    num_classes = 3

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Parameter(torch.tensor(0.5)), 2e-4, -3e-4
        self.e = torch.tensor([0.1, -0.2, 0.3, 0.05])  # row 3: the null class

    def forward(self, z, t, y, t2):
        return (
            self.a * z
            + self.b * t.view(-1, 1, 1, 1)
            + self.c * t2.view(-1, 1, 1, 1)
            + self.e[y].view(-1, 1, 1, 1)
        )

    def null_condition(self, y):
        return {"y": torch.full_like(y, 3)}


def test_training_losses_by_hand_guided_dropped_and_weighted():
    """Target v_g - (t - r)(a v_g + (b + c) 1000) with v_g = omega v + kappa u(z,t,t|y) + (1 - omega
    - kappa) u(z,t,t|null) (paper eq. 19), v_g = v for a dropped label, adaptive weight sq / (sq +
    eps) (p = 1), float64."""
    model = LinearU().double()
    obj = MeanFlow(omega=1.5, kappa=0.3, norm_eps=0.01)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 1, 2, 2, generator=g, dtype=torch.float64)
    eps = torch.randn(3, 1, 2, 2, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 1, 2])
    t = torch.tensor([0.9, 0.5, 0.4], dtype=torch.float64)
    r = torch.tensor([0.1, 0.5, 0.0], dtype=torch.float64)
    drop = torch.tensor([False, False, True])
    losses = obj.training_losses(model, {"x": x, "y": y}, t=t, r=r, noise=eps, drop=drop)

    a, b, c, e = 0.5, 2e-4, -3e-4, model.e.double()
    tb, rb = t.view(-1, 1, 1, 1), r.view(-1, 1, 1, 1)
    z = (1 - tb) * x + tb * eps
    v = eps - x
    u_inst = a * z + b * TS * tb  # u(z, t, t | .) without the class term
    v_g = 1.5 * v + 0.3 * (u_inst + e[y].view(-1, 1, 1, 1)) + (1 - 1.5 - 0.3) * (u_inst + e[3])
    v_g[2] = v[2]
    y_in = torch.tensor([0, 1, 3])
    u = a * z + b * TS * tb + c * TS * (tb - rb) + e[y_in].view(-1, 1, 1, 1)
    target = v_g - (tb - rb) * (a * v_g + (b + c) * TS)
    sq = ((u - target) ** 2).sum((1, 2, 3))
    torch.testing.assert_close(losses["loss"], sq / (sq + 0.01), rtol=1e-12, atol=0)
    torch.testing.assert_close(losses["mse"], sq / 4, rtol=1e-12, atol=0)
    losses["loss"].sum().backward()
    assert model.a.grad is not None and model.a.grad != 0


def test_sample_tr_sorts_the_draws_and_sets_r_equal_t_on_the_share():
    obj = MeanFlow(equal_fraction=0.75, logit_mean=-0.4, logit_std=1.0)
    torch.manual_seed(3)
    t, r = obj.sample_tr(1000)
    torch.manual_seed(3)
    a = torch.sigmoid(-0.4 + torch.randn(1000))
    b = torch.sigmoid(-0.4 + torch.randn(1000))
    torch.testing.assert_close(t, torch.maximum(a, b))
    assert torch.equal(r[:750], t[:750])
    torch.testing.assert_close(r[750:], torch.minimum(a, b)[750:])
    assert (r[750:] < t[750:]).all()


def test_jvp_uses_the_math_kernel_and_everything_else_the_fused_one():
    """The CPU's fused SDPA kernel has no forward-mode derivative (pytorch#165530): plain
    torch.func.jvp through the DiT fails. MeanFlow's JVP runs SDPA's math kernel; the guidance
    forward of the same step keeps the fused kernel (read from the profiler's op names)."""
    model = random_dit().float().train()
    obj = MeanFlow(omega=2.0)
    batch = {"x": torch.randn(2, 4, 8, 8), "y": torch.tensor([1, 2])}
    t2 = torch.zeros(2)
    with pytest.raises(NotImplementedError, match="forward AD"):
        torch.func.jvp(lambda z: model(z, t2, batch["y"], t2=t2), (batch["x"],), (batch["x"],))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        obj.training_losses(model, batch)
    ops = {e.key for e in prof.key_averages()}
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in ops  # the guidance forward
    assert "aten::_scaled_dot_product_attention_math" in ops  # the JVP


def test_dit_second_time_adds_only_its_embedder_and_is_required_then():
    """Without second_time the DiT's state_dict is today's; with it, only t2_embedder.* is added,
    forward needs t2 and forward_flops counts the extra MLP."""
    kwargs = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2)
    torch.manual_seed(0)
    plain = DiT(**kwargs)
    torch.manual_seed(0)
    default = DiT(**kwargs, second_time=False, guidance_input=False)
    assert plain.state_dict().keys() == default.state_dict().keys()
    both = DiT(**kwargs, second_time=True, guidance_input=True)
    extra = set(both.state_dict()) - set(plain.state_dict())
    assert {k.split(".")[0] for k in extra} == {"t2_embedder", "w_embedder"}
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2) * 1000, torch.tensor([0, 1])
    with pytest.raises(ValueError, match="second_time"):
        plain(x, t, y, t2=t)
    with pytest.raises(ValueError, match="second_time"):
        DiT(**kwargs, second_time=True)(x, t, y)
    assert both.forward_flops(2) == count_flops(both, x, t, y, t2=t, w=t)


def test_jit_second_time_adds_only_its_embedder_and_is_required_then():
    """JiT takes MeanFlow's second time as DiT does: off, the state_dict is today's; on, only
    t2_embedder.* / w_embedder.* are added, forward needs t2 and forward_flops counts the MLPs."""
    torch.manual_seed(0)
    plain = JiT(**TINY_JIT)
    both = JiT(**TINY_JIT, second_time=True, guidance_input=True)
    extra = set(both.state_dict()) - set(plain.state_dict())
    assert {k.split(".")[0] for k in extra} == {"t2_embedder", "w_embedder"}
    assert set(plain.state_dict()) <= set(both.state_dict())
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2) * 1000, torch.tensor([0, 1])
    with pytest.raises(ValueError, match="second_time"):
        plain(x, t, y, t2=t)
    with pytest.raises(ValueError, match="second_time"):
        JiT(**TINY_JIT, second_time=True)(x, t, y)
    assert both.forward_flops(2) == count_flops(both, x, t, y, t2=t, w=t)
    MeanFlow().bind(JiT(**TINY_JIT, second_time=True))  # the objective accepts it


def test_meanflow_refuses_a_backbone_without_the_second_time():
    kwargs = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2)
    with pytest.raises(ValueError, match="model.second_time=true"):
        MeanFlow().bind(DiT(**kwargs))
    with pytest.raises(ValueError, match="model.guidance_input=true"):
        MeanFlow(guidance_input=[1.0, 4.0]).bind(DiT(**kwargs, second_time=True))
    with pytest.raises(ValueError, match="equal_fraction"):
        MeanFlow(equal_fraction=1.5)


MEANFLOW = ("objective=meanflow", "model.second_time=true", "model.learn_sigma=false")


@pytest.mark.slow
def test_fsdp2_meanflow_run_resumes_exactly(
    tmp_path,
    tiny_model,
    data_overrides,
    run_overrides,
    write_synthetic_shards,
    run_train,
    torchrun_cmd,
):
    """2 processes, FSDP2, guided MeanFlow (the JVP through all-gathered blocks): 4 steps straight
    == 2 steps, new processes, 2 more, bit for bit (weights, EMA, optimizer moments)."""
    from ditkit.checkpoints import consolidate_checkpoint

    shards = write_synthetic_shards(tmp_path / "shards")
    out = tmp_path / "runs"

    def args(name: str, steps: int) -> list[str]:
        return [
            *tiny_model,
            *MEANFLOW,
            "objective.omega=2.0",
            *data_overrides(shards),
            *run_overrides(out, steps, 2),
            f"run_name={name}",
            "strategy=fsdp",
            "trainer.devices=2",
        ]

    run_train(cmd=torchrun_cmd(2, *args("straight", 4)), timeout=300)
    run_train(cmd=torchrun_cmd(2, *args("resumed", 2)), timeout=300)
    run_train(cmd=torchrun_cmd(2, *args("resumed", 4)), timeout=300)
    straight = torch.load(
        consolidate_checkpoint(out / "straight/checkpoints/last.ckpt"), weights_only=True
    )
    resumed = torch.load(
        consolidate_checkpoint(out / "resumed/checkpoints/last.ckpt"), weights_only=True
    )
    assert straight["global_step"] == resumed["global_step"] == 4
    keys = straight["state_dict"].keys()
    assert "model.t2_embedder.mlp.0.weight" in keys and "ema.t2_embedder.mlp.0.weight" in keys
    for key in keys:
        assert torch.equal(straight["state_dict"][key], resumed["state_dict"][key]), key
    # The weights moved (so equality is not that of two untouched models): the model left its EMA.
    weight = "t2_embedder.mlp.0.weight"
    assert not torch.equal(
        straight["state_dict"][f"model.{weight}"], straight["state_dict"][f"ema.{weight}"]
    )
    moments_a = straight["optimizer_states"][0]["state"]
    moments_b = resumed["optimizer_states"][0]["state"]
    for i in moments_a:
        for moment in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(moments_a[i][moment], moments_b[i][moment]), (i, moment)


def test_activation_checkpointing_with_the_jvp_is_refused_by_name():
    """torch.utils.checkpoint fails inside a JVP; the run says which combination, before any work."""
    from ditkit.training import DiffusionModule

    kwargs = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2)
    model = DiT(**kwargs, learn_sigma=False, second_time=True)
    with pytest.raises(ValueError, match="objective=meanflow.*activation_checkpointing=true"):
        DiffusionModule(model, MeanFlow(), activation_checkpointing=True)


@pytest.mark.slow
def test_quickstart_meanflow_one_step_samples_are_the_digits_asked_for(tmp_path, run_train):
    """experiment=quickstart_meanflow end to end: 200 guided one-step samples (meanflow1, 1 NFE,
    guidance trained in, cfg_scale 1), at least 80% classified as the digit asked for by the SVM
    trained on the real digits."""
    import json

    run_train(
        "experiment=quickstart_meanflow",
        f"paths.output_dir={tmp_path / 'outputs'}",
        f"paths.data_dir={tmp_path / 'data'}",
        "logger=csv",
        timeout=1800,
    )
    (score_file,) = (tmp_path / "outputs").glob("*/digits_score.json")
    score = json.loads(score_file.read_text())
    print(f"quickstart_meanflow: digits accuracy {score['accuracy']:.1%}, {score['per_class']}")
    assert score["num_samples"] == 200 and score["cfg_scale"] == 1.0
    assert score["accuracy"] >= 0.8


class LinearUW(LinearU):
    """LinearU plus d * w: a guidance-scale input (improved MeanFlow's guidance as a condition)."""

    guidance_input = True

    def forward(self, z, t, y, t2, w):
        return super().forward(z, t, y, t2) + 0.01 * w.view(-1, 1, 1, 1)


def test_guidance_input_target_by_hand_and_the_sampler_passes_the_scale():
    """guidance_input=[2, 2] (omega fixed at 2 to compute by hand): v_g = v_u + 2 (v - v_u), v_u =
    u(z, t, t | null, w=2); the model gets w = 2 in the JVP too; meanflow1 needs the scale."""
    model = LinearUW().double()
    obj = MeanFlow(guidance_input=[2.0, 2.0], norm_eps=0.01)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 1, 2, 2, generator=g, dtype=torch.float64)
    eps = torch.randn(2, 1, 2, 2, generator=g, dtype=torch.float64)
    y, t, r = (
        torch.tensor([0, 2]),
        torch.tensor([0.8, 0.3]).double(),
        torch.tensor([0.2, 0.3]).double(),
    )
    drop = torch.tensor([False, False])
    losses = obj.training_losses(model, {"x": x, "y": y}, t=t, r=r, noise=eps, drop=drop)
    a, b, c, e = 0.5, 2e-4, -3e-4, model.e.double()
    tb, rb = t.view(-1, 1, 1, 1), r.view(-1, 1, 1, 1)
    z, v = (1 - tb) * x + tb * eps, eps - x
    v_u = a * z + b * tb + e[3] + 0.02
    v_g = v_u + 2 * (v - v_u)
    u = a * z + b * tb + c * (tb - rb) + e[y].view(-1, 1, 1, 1) + 0.02
    target = v_g - (tb - rb) * (a * v_g + (b + c))
    sq = ((u - target) ** 2).sum((1, 2, 3))
    torch.testing.assert_close(losses["loss"], sq / (sq + 0.01), rtol=1e-12, atol=0)
    noise = torch.zeros(2, 1, 2, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="guidance_scale"):
        obj.sample(model, noise, {"y": y}, sampler="meanflow1")
    out = obj.sample(model, noise, {"y": y}, sampler="meanflow1", guidance_scale=3.0)
    # z_0 = 0 - u(0, 0, 1) with w = 3: u = b + c + e[y] + 0.03
    expected = -(b + c + e[y] + 0.03).view(-1, 1, 1, 1).expand(2, 1, 2, 2)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)


def test_the_jvp_goes_through_compiled_blocks():
    """module.compile=true (compile_blocks) with MeanFlow: the JVP traces through torch.compile'd
    blocks and gives the eager loss and gradients. AOTAutograd's `aot_eager` backend runs the same
    graph capture and forward-mode decompositions as inductor without its minutes of CPU codegen;
    the two runs differ only by reassociation in the traced graph: float64, 1e-10."""
    from ditkit.training.parallel import compile_blocks

    obj = MeanFlow(omega=2.0)  # guided: the target's extra forward goes through the blocks too
    g = torch.Generator().manual_seed(3)
    batch = {"x": torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64)}
    batch["y"] = torch.tensor([1, 4, 10])  # 10: the null class
    t = torch.tensor([0.9, 0.6, 0.3], dtype=torch.float64)
    r = torch.tensor([0.2, 0.6, 0.0], dtype=torch.float64)
    noise = torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64)
    drop = torch.tensor([False, True, False])
    results = []
    for compiled in (False, True):
        model = random_dit()
        if compiled:
            torch._dynamo.reset()
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(
                    torch, "compile", lambda fn, **kw: torch._dynamo.optimize("aot_eager")(fn)
                )
                compile_blocks(model)
        loss = obj.training_losses(model, batch, t=t, r=r, noise=noise, drop=drop)["loss"].sum()
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    # The blocks really ran compiled: dynamo captured graphs (none if it had fallen back to eager).
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0
    (eager_loss, eager_grads), (comp_loss, comp_grads) = results
    torch.testing.assert_close(comp_loss, eager_loss, rtol=1e-10, atol=0)
    for a, b in zip(comp_grads, eager_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
