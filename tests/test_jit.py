"""JiT backbones (models/jit.py) against LTH14/JiT model_jit.py: sizes and parameter counts of the
six variants, where the class tokens join and leave, RoPE on image tokens only, dropout placement,
FLOPs, and the Backbone contract."""

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from ditkit.models import JiT, build_jit, check_backbone
from ditkit.models.embeddings import rope_2d
from ditkit.models.flops import count_flops

CONF = Path(__file__).resolve().parents[1] / "conf"


def reference_param_count(depth, d, heads, bottleneck, p, in_context=32, c=3, classes=1000):
    """Trainable parameters of LTH14/JiT's JiT, layer by layer as model_jit.py builds them."""
    hd, h = d // heads, int(int(d * 4.0) * 2 / 3)  # SwiGLUFFN: int(hidden * 2 / 3)
    block = (
        d  # norm1 (RMSNorm weight)
        + 3 * d * d + 3 * d  # qkv
        + 2 * hd  # q_norm, k_norm
        + d * d + d  # proj
        + d  # norm2
        + d * 2 * h + 2 * h + h * d + d  # w12, w3
        + d * 6 * d + 6 * d  # adaLN_modulation
    )  # fmt: skip
    n = depth * block
    n += 256 * d + d + d * d + d  # TimestepEmbedder
    n += (classes + 1) * d  # LabelEmbedder (with the null row)
    n += c * p * p * bottleneck + bottleneck * d + d  # BottleneckPatchEmbed (proj1 has no bias)
    n += in_context * d  # in_context_posemb (pos_embed is frozen)
    n += d + d * p * p * c + p * p * c + d * 2 * d + 2 * d  # FinalLayer
    return n


# name, image size, (depth, width, heads, bottleneck, patch), the paper's parameter count (M).
VARIANTS = [
    ("jit_b16", 256, (12, 768, 12, 128, 16), 131),
    ("jit_b32", 512, (12, 768, 12, 128, 32), 133),
    ("jit_l16", 256, (24, 1024, 16, 128, 16), 459),
    ("jit_l32", 512, (24, 1024, 16, 128, 32), 462),
    ("jit_h16", 256, (32, 1280, 16, 256, 16), 953),
    ("jit_h32", 512, (32, 1280, 16, 256, 32), 956),
]


def compose_model(name, size):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(
            overrides=[
                f"+data.latent_size={size}",
                "+data.latent_channels=3",
                "+data.num_classes=1000",
                f"+model={name}",
            ]
        )


@pytest.mark.parametrize("name,size,shape,paper_m", VARIANTS, ids=[v[0] for v in VARIANTS])
def test_variant_configs_have_the_reference_sizes_and_parameter_counts(name, size, shape, paper_m):
    with torch.device("meta"):
        model = instantiate(compose_model(name, size).model)
    depth, d, heads, bottleneck, p = shape
    assert isinstance(model, JiT)
    assert (model.depth, model.hidden_size, model.num_heads, model.patch_size) == (
        depth,
        d,
        heads,
        p,
    )
    assert model.x_embedder.proj1.out_channels == bottleneck
    start = {12: 4, 24: 8, 32: 10}[depth]
    assert (model.in_context_len, model.in_context_start) == (32, start)
    trainable = sum(q.numel() for q in model.parameters() if q.requires_grad)
    assert trainable == reference_param_count(depth, d, heads, bottleneck, p)
    assert round(trainable / 1e6) == paper_m
    if p == 16:  # the paper's Gflops (multiply-adds) at 256 px: 25, 88, 182
        assert round(model.forward_flops(1) / 2e9) == {12: 25, 24: 88, 32: 182}[depth]


def tiny_jit(**kw):
    torch.manual_seed(0)
    args = dict(
        input_size=16,
        patch_size=4,
        in_channels=3,
        hidden_size=32,
        depth=4,
        num_heads=2,
        bottleneck_dim=8,
        in_context_len=3,
        in_context_start=1,
        num_classes=10,
    )
    return JiT(**{**args, **kw})


def test_class_tokens_join_at_in_context_start_and_leave_before_the_head():
    model = tiny_jit().eval()
    seen = []

    def record(module, args):
        seen.append(args[0].detach().clone())

    for blk in model.blocks:
        blk.register_forward_pre_hook(record)
    x, t, y = torch.randn(2, 3, 16, 16), torch.tensor([10.0, 500.0]), torch.tensor([3, 7])
    out = model(x, t, y)
    assert out.shape == x.shape
    assert [s.shape[1] for s in seen] == [16, 19, 19, 19]  # 16 patches, then 3 class tokens + 16
    # The class tokens are the label embedding plus their learned position.
    y_emb = model.y_embedder.embedding_table.weight[y]
    torch.testing.assert_close(
        seen[1][:, :3], y_emb[:, None] + model.in_context_posemb, rtol=0, atol=0
    )


def test_rope_rotates_image_tokens_only():
    model = tiny_jit()
    assert torch.equal(model.rope, rope_2d(16, 4))
    table = model.rope_in_context  # (2, 3 + 16, hd): identity rotation on the 3 class tokens
    assert torch.equal(table[0, :3], torch.ones(3, 16)) and torch.equal(
        table[1, :3], torch.zeros(3, 16)
    )
    assert torch.equal(table[:, 3:], model.rope)


def test_dropout_only_in_the_middle_half_of_the_blocks():
    model = tiny_jit(depth=8, proj_dropout=0.2)
    ps = [getattr(b.attn_dropout, "p", 0.0) for b in model.blocks]
    assert ps == [0.0, 0.0, 0.2, 0.2, 0.2, 0.2, 0.0, 0.0]  # depth // 4 <= i < depth // 4 * 3
    assert [getattr(b.mlp.dropout, "p", 0.0) for b in model.blocks] == ps


def test_forward_flops_match_the_flop_counter():
    model = tiny_jit()
    x, t, y = torch.randn(2, 3, 16, 16), torch.rand(2) * 999, torch.randint(0, 10, (2,))
    counted = count_flops(model, x, t, y)
    assert abs(model.forward_flops(2) / counted - 1) < 0.01, (model.forward_flops(2), counted)


def test_meets_the_backbone_contract_and_guides_with_the_null_class():
    model = tiny_jit()
    check_backbone(model)
    assert model.learn_sigma is False and model.condition_keys == ("y",)
    assert model.null_condition(torch.tensor([1, 2]))["y"].tolist() == [10, 10]
    with pytest.raises(ValueError, match="does not divide"):
        tiny_jit(patch_size=5)
    with pytest.raises(ValueError, match="unknown JiT variant 'X'.*B, L, H"):
        build_jit("X")


def test_learns_a_fixed_target():
    """Regress a fixed random target: 60 AdamW steps cut the loss at least in half (the zero-init
    head and adaLN gates must open)."""
    model = tiny_jit(class_dropout_prob=0.0)
    x, t, y = torch.randn(8, 3, 16, 16), torch.randint(0, 1000, (8,)), torch.randint(0, 10, (8,))
    target = torch.randn(8, 3, 16, 16)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        loss = (model(x, t, y) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def compose_train(experiment, *overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=[f"experiment={experiment}", *overrides])


def test_jit_b16_in256_is_the_paper_recipe():
    cfg = compose_train("jit_b16_in256", "data.root=/data/in256-pixels")
    with torch.device("meta"):
        model = instantiate(cfg.model)
    objective = instantiate(cfg.objective)
    assert isinstance(model, JiT) and (model.input_size, model.patch_size) == (256, 16)
    assert round(sum(p.numel() for p in model.parameters()) / 1e6) == 131
    assert (objective.prediction, objective.loss_space, objective.t_eps) == ("x", "v", 0.05)
    # JiT's P_mean -0.8 (t = 1 clean) is ditkit's +0.8 (t = 1 noise): sigmoid(-z) = 1 - sigmoid(z).
    assert (objective.logit_mean, objective.logit_std, objective.noise_scale) == (0.8, 0.8, 1.0)
    assert cfg.optimizer.lr == 5e-5 * 1024 / 256 and list(cfg.optimizer.betas) == [0.9, 0.95]
    assert cfg.data.batch_size * 8 == 1024 and cfg.trainer.max_steps == 600 * 1251
    assert (cfg.module.ema_decay, dict(cfg.module.extra_ema)) == (0.9999, {"ema_9996": 0.9996})


def test_quickstart_jit_builds_a_pixel_space_jit():
    cfg = compose_train("quickstart_jit")
    model = instantiate(cfg.model)
    objective = instantiate(cfg.objective)
    assert isinstance(model, JiT) and (model.input_size, model.in_channels) == (16, 3)
    assert (model.in_context_len, model.in_context_start) == (4, 1)
    assert (objective.prediction, objective.loss_space) == ("x", "v")
    assert dict(cfg.module.extra_ema) == {"ema_99": 0.99}
