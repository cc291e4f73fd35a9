"""REG (ditkit.objectives.reg): DiT's prefix tokens equal a hand-built concatenation and change
nothing when absent, the class-token loss equals a hand computation, the token loss falls on a toy,
a backbone without prefix support fails at bind naming itself, a tiny REG run checkpoints the
token's embedding and head and resumes exactly, and evaluate.py samples its checkpoint to exactly
what the training module samples."""

# ruff: noqa: F811 - test_alignment's fixtures (teacher_dir) are imported, then taken as arguments
from __future__ import annotations

import numpy as np
import pytest
import torch
from test_alignment import (  # noqa: F401 - teacher_dir, teacher are fixtures
    batch,
    compose_train,
    encoder_args,
    teacher,
    teacher_dir,
    write_image_shards,
)

from ditkit.models.dit import modulate
from ditkit.objectives import REG, RectifiedFlow
from ditkit.objectives.terms import pack_tokens, unpack_tokens

# One intra-op thread for every test here (the shared `one_thread` fixture).
pytestmark = pytest.mark.usefixtures("one_thread")


def perturbed(model, seed: int = 5):
    """The model in float64 with every parameter moved off its (partly zero) initialisation, so
    every block and the final layer act."""
    g = torch.Generator().manual_seed(seed)
    model = model.double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def hand_forward(model, x, t, y, prefix):
    """DiT's forward written out with the prefix concatenated by hand: (output, last block)."""
    tokens = model.x_embedder(x) + model.pos_embed
    c = model.t_embedder(t) + model.y_embedder(y, False)
    h = torch.cat([prefix, tokens], dim=1)
    for blk in model.blocks:
        h = blk(h, c, None)
    return model.unpatchify(model.final_layer(h[:, prefix.shape[1] :], c)), h, c


def test_prefix_none_is_unchanged_and_a_prefix_is_a_hand_built_concatenation(tiny_dit):
    model = perturbed(tiny_dit(learn_sigma=False)).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64)
    t, y = torch.tensor([10.0, 500.0, 990.0], dtype=torch.float64), torch.tensor([1, 2, 10])
    prefix = torch.randn(3, 2, 32, generator=g, dtype=torch.float64)
    with torch.no_grad():
        plain = model(x, t, y)
        no_prefix, _, _ = hand_forward(model, x, t, y, prefix[:, :0])
        with_prefix = model(x, t, y, prefix=prefix)
        hand, _, _ = hand_forward(model, x, t, y, prefix)
    assert torch.equal(plain, no_prefix)  # prefix=None: the forward of before, bit for bit
    assert torch.equal(with_prefix, hand)
    assert (with_prefix - plain).abs().max() > 1e-3  # the image tokens attend to the prefix
    with pytest.raises(ValueError, match=r"\(N, K, hidden_size\) = \(3, K, 32\)"):
        model(x, t, y, prefix=prefix[..., :16])


class Features:
    def __init__(self, patches, cls):
        self.patches, self.cls = patches, cls


class FixedEncoder:
    """A stand-in teacher: fixed patch features (N, 16, 6) and class tokens (N, 6)."""

    dim, grid, name = 6, 4, "fixed"

    def __init__(self, n: int = 4):
        g = torch.Generator().manual_seed(7)
        self.feats = Features(torch.randn(n, 16, 6, generator=g), torch.randn(n, 6, generator=g))

    def __call__(self, image):
        return self.feats


def test_the_class_token_loss_is_the_hand_computation(tiny_dit):
    """float64, fixed t, noise and class token: z_t = (1 - t) z + t eps_z, the prefix LN(W z_t +
    b), the last block's position 0 through the final layer's norm and modulation and Linear(D, E),
    against eps_z - z (REG loss.py); the total is mse + 0.5 REPA + 0.03 cls."""
    model = perturbed(tiny_dit(learn_sigma=False)).eval()  # eval: no label dropout
    term = REG(FixedEncoder(), depth=1, weight=0.5, cls_weight=0.03, projector_dim=8)
    objective = RectifiedFlow(terms={"reg": term})
    objective.bind(model)
    term.double()
    with torch.no_grad():
        term.head.weight.normal_(0, 0.1, generator=torch.Generator().manual_seed(2))
        term.head.bias.fill_(0.01)
    b = {k: (v.double() if k == "x" else v) for k, v in batch().items()}
    t = torch.tensor([0.1, 0.4, 0.7, 0.95], dtype=torch.float64)
    noise = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    torch.manual_seed(11)
    losses = objective.training_losses(model, b, t=t, noise=noise)
    torch.manual_seed(11)
    eps_z = torch.randn(4, 1, 6, dtype=torch.float64)  # the token's noise: the next global draw

    z = term.encoder.feats.cls.double().unsqueeze(1)
    z_t = (1 - t.view(-1, 1, 1)) * z + t.view(-1, 1, 1) * eps_z
    w, bias = term.embed[0].weight, term.embed[0].bias
    lin = z_t @ w.T + bias
    prefix = (lin - lin.mean(-1, keepdim=True)) / torch.sqrt(
        lin.var(-1, unbiased=False, keepdim=True) + 1e-6
    )
    prefix = prefix * term.embed[1].weight + term.embed[1].bias
    with torch.no_grad():
        x_t = (1 - t.view(-1, 1, 1, 1)) * b["x"] + t.view(-1, 1, 1, 1) * noise
        out, h, c = hand_forward(model, x_t, t * 1000, b["y"], prefix)
        shift, scale = model.final_layer.adaLN_modulation(c).chunk(2, dim=1)
        h0 = h[:, :1]
        normed = (h0 - h0.mean(-1, keepdim=True)) / torch.sqrt(
            h0.var(-1, unbiased=False, keepdim=True) + 1e-6
        )
        pred = modulate(normed, shift, scale) @ term.head.weight.T + term.head.bias
    want_cls = ((pred - (eps_z - z)) ** 2).mean((1, 2))
    np.testing.assert_allclose(losses["reg_cls"].detach(), want_cls, rtol=0, atol=1e-12)
    want_mse = ((out - (noise - b["x"])) ** 2).mean((1, 2, 3))
    # (RectifiedFlow takes the image's output in float32: hence 1e-6 here)
    np.testing.assert_allclose(losses["mse"].detach(), want_mse, rtol=0, atol=1e-6)
    total = losses["mse"] + 0.5 * losses["reg"] + 0.03 * losses["reg_cls"]
    assert torch.equal(losses["loss"], total)
    assert -1 <= losses["reg"].min() and losses["reg"].max() <= 1


def test_with_a_zero_head_the_token_loss_is_the_target_energy(tiny_dit):
    """Closed form: the head starts at zero (linear_cls's init), so the prediction is 0 and the
    loss is mean_E (eps_z - z)^2 exactly, whatever the backbone does."""
    model = perturbed(tiny_dit(learn_sigma=False))
    term = REG(FixedEncoder(), depth=1, projector_dim=8)
    objective = RectifiedFlow(terms={"reg": term})
    objective.bind(model)
    term.double()
    b = {k: (v.double() if k == "x" else v) for k, v in batch().items()}
    torch.manual_seed(4)
    losses = objective.training_losses(model, b)
    torch.manual_seed(4)  # replay the draws in order: t (logit-normal), the image's noise, eps_z
    torch.randn(4)
    torch.randn(4, 4, 8, 8, dtype=torch.float64)  # the image's noise
    eps_z = torch.randn(4, 1, 6, dtype=torch.float64)
    z = term.encoder.feats.cls.double().unsqueeze(1)
    want = ((eps_z - z) ** 2).mean((1, 2))
    np.testing.assert_allclose(losses["reg_cls"].detach(), want, rtol=0, atol=1e-12)


def test_the_token_loss_falls_when_the_model_can_reach_the_target(tiny_dit):
    """One fixed batch, one fixed class token per label: 150 Adam steps on backbone and term more
    than halve the class token's loss (unit noise on a constant token: the best prediction is far
    below its zero-head start, 1 + |z|^2 / E)."""
    torch.manual_seed(0)
    model = tiny_dit(learn_sigma=False)
    term = REG(FixedEncoder(), depth=1, projector_dim=8, weight=0.5, cls_weight=1.0)
    objective = RectifiedFlow(terms={"reg": term})
    objective.bind(model)
    b = batch()
    params = [*model.parameters(), *term.parameters()]
    opt = torch.optim.Adam(params, lr=3e-3)
    history = []
    for step in range(150):
        torch.manual_seed(step)
        losses = objective.training_losses(model, b)
        opt.zero_grad()
        losses["loss"].mean().backward()
        opt.step()
        history.append(losses["reg_cls"].mean().item())
    first, last = np.mean(history[:10]), np.mean(history[-10:])
    assert last < 0.5 * first, (first, last)


def test_a_backbone_without_prefix_support_fails_at_bind_naming_it(tiny_dit):
    class NoPrefix(torch.nn.Module):
        blocks = torch.nn.ModuleList([torch.nn.Identity()])
        hidden_size, input_size, patch_size = 32, 8, 2

    objective = RectifiedFlow(terms={"reg": REG(FixedEncoder(), depth=1)})
    with pytest.raises(ValueError, match=r"NoPrefix does not take.*accepts_prefix"):
        objective.bind(NoPrefix())
    from ditkit.objectives import GaussianDiffusion

    with pytest.raises(ValueError, match=r"objective=ddpm does not do: use objective=flow"):
        GaussianDiffusion(terms={"reg": REG(FixedEncoder(), depth=1)}).bind(tiny_dit())


def test_tokens_pack_into_channels_and_back():
    tokens = torch.arange(2 * 1 * 70, dtype=torch.float64).reshape(2, 1, 70)
    packed = pack_tokens(tokens, 4, 4)  # 70 values in ceil(70 / 16) = 5 channels of 4 x 4
    assert packed.shape == (2, 5, 4, 4)
    assert packed.reshape(2, -1)[:, 70:].abs().sum() == 0  # zero padding
    assert torch.equal(unpack_tokens(packed, 1, 70), tokens)


def test_sampling_integrates_the_token_jointly_with_euler(tiny_dit):
    """The joint state's Euler steps equal a hand-written loop over (image, token) with the
    backbone's prefix forward: x += dt v_x, z += dt v_z, z from unit noise."""
    model = perturbed(tiny_dit(learn_sigma=False)).eval()
    term = REG(None, depth=1, projector_dim=8, token_dim=6)
    objective = RectifiedFlow(terms={"reg": term})
    objective.bind(model)
    term.double().eval()
    with torch.no_grad():
        term.head.weight.normal_(0, 0.1, generator=torch.Generator().manual_seed(2))
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y = torch.tensor([3, 4])
    torch.manual_seed(9)
    got = objective.sample(model, x_T, {"y": y}, sampler="euler", steps=3)
    torch.manual_seed(9)
    x, z = x_T, torch.randn(2, 1, 6, dtype=torch.float64)
    grid = objective.time_grid(3, 8, 8)
    with torch.no_grad():
        for t, t_next in zip(grid[:-1], grid[1:], strict=True):
            tt = torch.full((2,), t * 1000.0)  # float32, as guided_velocity builds it
            v, v_z, _ = term.joint_forward(model, x, tt, {"y": y}, z)
            x, z = x + (t_next - t) * v, z + (t_next - t) * v_z
    assert got.shape == x_T.shape
    assert torch.equal(got, x)


def reg_run_args(tiny_model, data_overrides, run_overrides, teacher_dir, out, shards, name, steps):
    return [
        *tiny_model,
        *data_overrides(shards),
        *run_overrides(out, steps, 2),
        *encoder_args(teacher_dir),
        "alignment=reg",
        "alignment.depth=1",
        "alignment.projector_dim=16",
        f"run_name={name}",
        "optimizer.lr=1e-3",
        "objective=flow",
        "model.learn_sigma=false",
    ]


@pytest.mark.slow
def test_a_reg_run_checkpoints_its_heads_resumes_exactly_and_samples_as_in_training(
    tmp_path, teacher_dir, tiny_model, data_overrides, run_overrides, run_train
):
    """4 steps straight == 2 steps, a new process, 2 more (every weight, EMA, the token's embedding
    and head and their EMA); then evaluate.py's build samples the checkpoint to exactly what the
    training module restored from it samples, with guidance, same noise, same seed."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from ditkit.checkpoints import read_checkpoint
    from evaluate import build

    shards = write_image_shards(tmp_path / "shards")
    out = tmp_path / "runs"
    common = (tiny_model, data_overrides, run_overrides, teacher_dir, out, shards)
    run_train(*reg_run_args(*common, "straight", 4))
    run_train(*reg_run_args(*common, "resumed", 2))
    run_train(*reg_run_args(*common, "resumed", 4))
    path = out / "straight/checkpoints/last.ckpt"
    straight = torch.load(path, weights_only=True)
    resumed = torch.load(out / "resumed/checkpoints/last.ckpt", weights_only=True)
    keys = set(straight["state_dict"])
    assert {
        "objective_modules.reg.embed.0.weight",
        "objective_modules.reg.head.weight",
        "ema_objective.reg.embed.1.weight",
        "ema_objective.reg.head.bias",
    } <= keys
    assert not any("encoder" in k for k in keys)  # the frozen teacher is never saved
    for key in keys:
        assert torch.equal(straight["state_dict"][key], resumed["state_dict"][key]), key
    header, *rows = (out / "straight/csv/version_0/metrics.csv").read_text().splitlines()
    assert {"train/reg", "train/reg_cls"} <= set(header.split(","))

    # The training module, rebuilt from the run's config and the checkpoint.
    cfg = compose_train(*reg_run_args(*common, "straight", 4))
    module = instantiate(cfg.module)(instantiate(cfg.model), instantiate(cfg.objective))
    module.load_state_dict(straight["state_dict"])
    noise = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2, 10])
    kw = dict(sampler="heun", steps=3, cfg_scale=2.0)
    torch.manual_seed(5)
    trained = module.sample(noise, {"y": y}, **kw)
    # evaluate.py's path: read_checkpoint (EMA) + build (terms sampling needs, no encoder).
    ckpt = read_checkpoint(path)
    eval_cfg = OmegaConf.create({"ckpt": str(path), "vae": None, "objective": None})
    model, objective, _, _ = build(eval_cfg, ckpt)
    assert list(objective.terms) == ["reg"] and objective.terms["reg"].encoder is None
    torch.manual_seed(5)
    evaluated = objective.sample(model, noise, {"y": y}, **kw)
    assert torch.equal(trained, evaluated)
    # and the EMA heads were used: the raw heads give other samples
    raw = read_checkpoint(path, "raw")
    assert not torch.equal(raw.terms["reg"]["head.weight"], ckpt.terms["reg"]["head.weight"])


def test_the_papers_recipe_and_a_bad_alignment_name():
    """REG SiT-XL/2 (train.sh / eval.sh of Martinser/REG): REPA's settings, --cls 0.03, EMA of the
    heads on; a misspelt alignment= names the valid choices."""
    from hydra.errors import MissingConfigException

    cfg = compose_train("experiment=reg_sit_xl2_in256")
    term = cfg.objective.terms.reg
    assert term._target_ == "ditkit.objectives.REG" and term.encoder.name == "dinov2_b"
    assert (term.depth, term.weight, term.cls_weight, term.projector_dim) == (8, 0.5, 0.03, 2048)
    assert cfg.objective._target_.endswith("RectifiedFlow") and cfg.model.learn_sigma is False
    assert cfg.module.ema_objective_modules is True and cfg.trainer.max_steps == 4_000_000
    assert compose_train("objective=flow").module.ema_objective_modules is False
    with pytest.raises(MissingConfigException, match=r"(?s)alignment.*irepa.*reg.*repa"):
        compose_train("alignment=regg")


def test_the_training_module_samples_with_the_terms_ema(tiny_dit):
    """module.sample and the FID callback hand the objective the EMA copy of REG's heads: a
    sample with them equals objective.sample given the EMA term by hand, and differs from the
    trained term's."""
    from ditkit.evaluation.callback import sampling_terms
    from ditkit.training import DiffusionModule

    term = REG(FixedEncoder(), depth=1, projector_dim=8)
    module = DiffusionModule(
        tiny_dit(learn_sigma=False), RectifiedFlow(terms={"reg": term}), ema_objective_modules=True
    )
    shadow = module.ema_objective["reg"]
    with torch.no_grad():
        shadow.head.weight.normal_(0, 0.3, generator=torch.Generator().manual_seed(1))
        for p in module.ema.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(2)))
    assert sampling_terms(module) == {"terms": {"reg": shadow}}
    assert module.sampling_terms(use_ema=False) == {"reg": term}
    noise, y = (
        torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)),
        torch.tensor([1, 2]),
    )
    torch.manual_seed(3)
    got = module.sample(noise, {"y": y}, sampler="euler", steps=2)
    torch.manual_seed(3)
    want = module.objective.sample(module.ema, noise, {"y": y}, steps=2, terms={"reg": shadow})
    torch.manual_seed(3)
    trained_heads = module.objective.sample(module.ema, noise, {"y": y}, steps=2)
    assert torch.equal(got, want)
    assert not torch.equal(got, trained_heads)
