"""MMDiT (SD3): joint attention against a written-out reference, stream coupling, the cropped position
table, caption dropout, FLOPs, configs, and a short fit."""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from ditkit.checkpoints import instantiate_model
from ditkit.models import MMDiT
from ditkit.models.embeddings import sincos_1d
from ditkit.models.mmdit import JointBlock

CONF = Path(__file__).parents[1] / "conf"


@pytest.fixture(autouse=True)
def one_thread_seeded():
    """Tiny models run fastest on one thread (two threads on a loaded 2-core machine run 30x slower);
    a fixed seed makes every initialisation, and so every test, the same in any order."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


TINY = dict(
    input_size=8,
    patch_size=2,
    in_channels=4,
    depth=2,
    head_dim=16,
    context_dim=12,
    pooled_dim=6,
    context_len=5,
)


def perturb(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights everywhere (zero-initialised gates would hide every interaction)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    return module.eval()


def inputs(n: int = 2, hw: int = 8, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(n, 4, hw, hw, generator=g),
        torch.rand(n, generator=g) * 1000,
        torch.randn(n, 5, 12, generator=g),
        torch.randn(n, 6, generator=g),
    )


# ---- the reference: every projection separate, one softmax over the joined sequence ----------------


def ref_rms(x, weight):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * weight


def ref_pre(stream, x, c, heads, qk_norm):
    d = x.shape[-1]
    lin = stream.adaLN_modulation[1]
    mods = (F.silu(c) @ lin.weight.T + lin.bias).chunk(lin.out_features // d, dim=1)
    h = F.layer_norm(x, (d,), eps=1e-6) * (1 + mods[1][:, None]) + mods[0][:, None]
    w, b = stream.attn.qkv.weight, stream.attn.qkv.bias
    q, k, v = (
        (h @ w[i * d : (i + 1) * d].T + b[i * d : (i + 1) * d]).unflatten(-1, (heads, d // heads))
        for i in range(3)
    )
    if qk_norm:
        q, k = ref_rms(q, stream.attn.q_norm.weight), ref_rms(k, stream.attn.k_norm.weight)
    return (q, k, v), mods[2:]


def ref_post(stream, x, out, mods):
    gate_msa, shift_mlp, scale_mlp, gate_mlp = mods
    x = x + gate_msa[:, None] * (out @ stream.attn.proj.weight.T + stream.attn.proj.bias)
    h = F.layer_norm(x, (x.shape[-1],), eps=1e-6) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
    h = F.gelu(h @ stream.mlp.fc1.weight.T + stream.mlp.fc1.bias, approximate="tanh")
    return x + gate_mlp[:, None] * (h @ stream.mlp.fc2.weight.T + stream.mlp.fc2.bias)


def ref_block(block, x, ctx, c, heads, qk_norm):
    (qi, ki, vi), mods_i = ref_pre(block.image, x, c, heads, qk_norm)
    (qt, kt, vt), mods_t = ref_pre(block.text, ctx, c, heads, qk_norm)
    q, k, v = (
        torch.cat([qi, qt], 1),
        torch.cat([ki, kt], 1),
        torch.cat([vi, vt], 1),
    )  # (N, T + L, heads, hd)
    scores = torch.einsum("nshd,nrhd->nhsr", q, k) / math.sqrt(q.shape[-1])
    out = torch.einsum("nhsr,nrhd->nshd", scores.softmax(dim=-1), v).flatten(2)
    t = x.shape[1]
    x_out = ref_post(block.image, x, out[:, :t], mods_i)
    return x_out, None if block.text.pre_only else ref_post(block.text, ctx, out[:, t:], mods_t)


@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("last", [False, True])
def test_joint_block_equals_reference(qk_norm, last):
    block = perturb(JointBlock(32, 2, 4.0, qk_norm, last=last)).double()
    g = torch.Generator().manual_seed(3)
    x, ctx, c = (
        torch.randn(2, 16, 32, generator=g, dtype=torch.float64),
        torch.randn(2, 5, 32, generator=g, dtype=torch.float64),
        torch.randn(2, 32, generator=g, dtype=torch.float64),
    )
    with torch.no_grad():
        got_x, got_ctx = block(x, ctx, c)
        want_x, want_ctx = ref_block(block, x, ctx, c, heads=2, qk_norm=qk_norm)
    # Two float64 computations of outputs that reach ~30: they agree to ~1e-13 on any CPU (in
    # float32 the two orders of summation would differ by ~1e-5, by more on some CPUs).
    torch.testing.assert_close(got_x, want_x, rtol=0, atol=1e-10)
    if last:
        assert got_ctx is None and not hasattr(block.text, "mlp") and block.text.attn.proj is None
    else:
        torch.testing.assert_close(got_ctx, want_ctx, rtol=0, atol=1e-10)


def test_text_changes_image_and_image_changes_text():
    model = perturb(MMDiT(**TINY))
    x, t, ctx, pooled = inputs()
    ctx2 = ctx.clone()
    ctx2[0, 3] += torch.randn(12)  # one text token of sample 0
    with torch.no_grad():
        out, out2 = model(x, t, ctx, pooled), model(x, t, ctx2, pooled)
    assert (out[0] - out2[0]).abs().max() > 1e-3
    torch.testing.assert_close(out[1], out2[1], rtol=0, atol=0)  # samples stay independent
    block = model.blocks[0]
    tokens, text, c = torch.randn(2, 16, 32), torch.randn(2, 5, 32), torch.randn(2, 32)
    tokens2 = tokens.clone()
    tokens2[0, 7] += torch.randn(
        32
    )  # one image token (not a constant shift: LayerNorm removes those)
    with torch.no_grad():
        _, text_a = block(tokens, text, c)
        _, text_b = block(tokens2, text, c)
    assert (text_a[0] - text_b[0]).abs().max() > 1e-3
    torch.testing.assert_close(text_a[1], text_b[1], rtol=0, atol=0)


def test_last_block_text_output_is_unused():
    """Text queries of the last block only shape text outputs, which are dropped: changing them changes
    nothing. The same change in the first block, or the last block's text keys, changes the image."""
    model = perturb(MMDiT(**TINY))
    x, t, ctx, pooled = inputs()
    d = model.hidden_size
    with torch.no_grad():
        base = model(x, t, ctx, pooled)
        outs = {}
        for name, block, rows in [
            ("last_q", -1, slice(0, d)),
            ("first_q", 0, slice(0, d)),
            ("last_k", -1, slice(d, 2 * d)),
        ]:
            weight = model.blocks[block].text.attn.qkv.weight
            saved = weight.clone()
            weight[rows] += 0.5
            outs[name] = model(x, t, ctx, pooled)
            weight.copy_(saved)
    torch.testing.assert_close(outs["last_q"], base, rtol=0, atol=0)
    assert (outs["first_q"] - base).abs().max() > 1e-3
    assert (outs["last_k"] - base).abs().max() > 1e-3


@pytest.mark.parametrize("hw,offset", [(8, 2), (12, 1)])
def test_cropped_position_table(hw, offset):
    """A 4x4 (8 px) or 6x6 (12 px) grid gets the centre of the 8x8 table: the sin-cos values of rows and
    columns shifted by (8 - grid) // 2."""
    model = MMDiT(**TINY, pos_embed_max_size=8)
    grid = hw // 2
    coords = torch.arange(grid, dtype=torch.float64) + offset
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    want = torch.cat([sincos_1d(16, cols.flatten()), sincos_1d(16, rows.flatten())], dim=1).float()
    torch.testing.assert_close(model.cropped_pos_embed(grid, grid), want, rtol=0, atol=1e-6)
    out = perturb(model)(*inputs(hw=hw))
    assert out.shape == (2, 4, hw, hw) and torch.isfinite(out).all()


def test_position_table_and_size_errors():
    with pytest.raises(ValueError, match="exceeds pos_embed_max_size 6"):
        MMDiT(**TINY, pos_embed_max_size=6)(*inputs(hw=16))
    with pytest.raises(ValueError, match="pos_embed_max_size 2 is smaller than the latent grid 4"):
        MMDiT(**TINY, pos_embed_max_size=2)
    with pytest.raises(ValueError, match="patch_size 3 does not divide the latent size 8"):
        MMDiT(**{**TINY, "patch_size": 3})
    x, t, ctx, pooled = inputs()
    with pytest.raises(ValueError, match="context_dim 12"):
        MMDiT(**TINY)(x, t, ctx[..., :10], pooled)


def test_caption_dropout_substitutes_the_zero_null_condition():
    model = perturb(MMDiT(**TINY, caption_dropout_prob=0.5))
    x, t, ctx, pooled = inputs(n=8)
    torch.manual_seed(5)
    drop = torch.rand(8) < 0.5
    assert 0 < drop.sum() < 8
    torch.manual_seed(5)
    with torch.no_grad():
        trained = model.train()(x, t, ctx, pooled)
        model.eval()
        null = model.null_condition(ctx, pooled)
        assert (
            null["context"].shape == ctx.shape
            and not null["context"].any()
            and not null["pooled"].any()
        )
        want = torch.where(drop[:, None, None, None], model(x, t, **null), model(x, t, ctx, pooled))
    torch.testing.assert_close(trained, want, rtol=0, atol=1e-6)


def test_forward_flops_equal_the_counted_matmuls():
    model = MMDiT(**{**TINY, "depth": 3}, learn_sigma=True).eval()
    with (
        sdpa_kernel(SDPBackend.MATH),
        FlopCounterMode(display=False) as counter,
    ):  # math SDPA = counted bmm
        model(*inputs(n=3))
    assert model.forward_flops(batch_size=3) == counter.get_total_flops()


def closed_form_params(
    d: int, depth: int, p: int = 2, c: int = 16, dc: int = 4096, dp: int = 2048
) -> int:
    """Parameter count from the architecture: full streams, the last pre-only text stream, embedders, head."""
    full = (
        (3 * d * d + 3 * d) + (d * d + d) + (8 * d * d + 5 * d) + (6 * d * d + 6 * d)
    )  # qkv, proj, MLP, adaLN
    pre_only = (3 * d * d + 3 * d) + (2 * d * d + 2 * d)
    blocks = (2 * depth - 1) * full + pre_only
    embed = (
        (c * p * p * d + d) + (256 * d + d + d * d + d) + (dc * d + d) + (dp * d + d + d * d + d)
    )
    head = (2 * d * d + 2 * d) + (d * p * p * c + p * p * c)
    return blocks + embed + head


def compose_model(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(
            overrides=[
                "+data.latent_size=64",
                "+data.latent_channels=16",
                "+data.context_dim=4096",
                "+data.pooled_dim=2048",
                "+data.context_len=154",
                *overrides,
            ]
        )


@pytest.mark.parametrize(
    "overrides,depth",
    [
        (["+model=mmdit_d12"], 12),
        (["+model=mmdit_d24"], 24),
        (["+model=mmdit_d12", "model.depth=16"], 16),
    ],
)
def test_hydra_configs_size_by_depth(overrides, depth):
    cfg = compose_model(*overrides)
    with torch.device("meta"):
        model = instantiate_model(cfg.model)
    assert isinstance(model, MMDiT) and (model.depth, model.num_heads, model.hidden_size) == (
        depth,
        depth,
        64 * depth,
    )
    assert sum(p.numel() for p in model.parameters()) == closed_form_params(64 * depth, depth)
    assert len(model.blocks) == depth


def test_sd3_medium_size():
    """Depth 24 is SD3's 2B model (paper Sec. 5.3): 2.03 B parameters with 16 latent channels."""
    with torch.device("meta"):
        model = MMDiT(depth=24, input_size=128)
    assert (
        sum(p.numel() for p in model.parameters()) == closed_form_params(1536, 24) == 2_028_328_000
    )


def test_training_loss_falls_and_follows_the_text():
    """Fit a text-dependent target: 4 'captions', each with its own random target. After 60 AdamW steps
    the loss is under a third of its start and each output is nearest its own caption's target."""
    torch.manual_seed(0)
    model = MMDiT(**TINY, caption_dropout_prob=0.0)
    ctx, pooled, target = torch.randn(4, 5, 12), torch.randn(4, 6), torch.randn(4, 4, 8, 8)
    x, t = (
        torch.randn(1, 4, 8, 8).expand(4, -1, -1, -1),
        torch.full((4,), 500.0),
    )  # only the text differs
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        loss = (model(x, t, ctx, pooled) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 3, losses
    with torch.no_grad():
        swapped = model(x, t, ctx.flip(0), pooled.flip(0))  # same images, other captions
    dist = torch.cdist(swapped.flatten(1), target.flatten(1))
    assert torch.equal(dist.argmin(dim=1), torch.arange(3, -1, -1))


def test_guidance_pairs_the_text_with_the_zero_null_condition():
    """One Euler step of rectified flow from t=1 with cfg: x_0 = x_T - [v_null + s (v_text - v_null)],
    v_null being the model on the zero condition (what caption dropout trains). In float64: the
    guided call runs a batch of 6 where the check runs 3, and float32 matmuls of other shapes round
    differently from CPU to CPU (7e-5 seen on an AMD EPYC); in float64 that is ~1e-15."""
    from ditkit.objectives import RectifiedFlow

    model = perturb(MMDiT(**TINY)).double()
    x, _, ctx, pooled = (v.double() for v in inputs(n=3))
    t = torch.full((3,), 1000.0)
    flow = RectifiedFlow(time_sampling="uniform")
    with torch.no_grad():
        got = flow.sample(
            model,
            x,
            model_kwargs={"context": ctx, "pooled": pooled},
            sampler="euler",
            steps=1,
            cfg_scale=3.0,
        )
        v_text = model(x, t, ctx, pooled)
        v_null = model(x, t, torch.zeros_like(ctx), torch.zeros_like(pooled))
    torch.testing.assert_close(got, x - (v_null + 3.0 * (v_text - v_null)), rtol=0, atol=1e-12)


def test_config_errors_name_the_fix():
    """MMDiT on data without text, and a label model on data with text, fail before any work."""
    from hydra.errors import InstantiationException

    from ditkit.training.checks import ConfigError, check_model_fits_data

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            overrides=["+model=mmdit_d12", "+data.latent_size=16", "+data.latent_channels=3"]
        )
    with pytest.raises(InstantiationException, match="train it on captioned shards"):
        instantiate_model(cfg.model)
    with pytest.raises(ConfigError, match="use a text-to-image model"):
        check_model_fits_data(
            {"_target_": "ditkit.models.build_dit", "variant": "S"}, {"context_dim": 32}
        )
    check_model_fits_data(
        {"_target_": "ditkit.models.MMDiT", "context_dim": 32}, {"context_dim": 32}
    )
