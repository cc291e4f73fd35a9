"""The U-Net baseline: DiT's interface, label dropout, guidance (known numbers), training with both
objectives, configs sized to DiT-S/2 and DiT-B/2, and errors that name the config key."""

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from ditkit.models import UNet, build_dit
from ditkit.objectives import GaussianDiffusion, Guidance, RectifiedFlow

CONF = Path(__file__).parents[1] / "conf"
TINY = dict(
    input_size=8,
    in_channels=4,
    num_classes=10,
    block_out_channels=(16, 32),
    attention_levels=(1,),
    attention_head_dim=8,
    norm_num_groups=8,
)


def tiny_unet(**overrides) -> UNet:
    """A tiny U-Net with non-zero outputs (the zero-initialised output conv re-drawn)."""
    torch.manual_seed(0)
    model = UNet(**{**TINY, **overrides})
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1)
    return model


def inputs(n: int = 4):
    g = torch.Generator().manual_seed(1)
    return (
        torch.randn(n, 4, 8, 8, generator=g),
        torch.rand(n, generator=g) * 999,
        torch.randint(0, 10, (n,), generator=g),
    )


def test_interface_and_zero_initialised_output():
    model = UNet(**TINY).eval()
    assert (model.in_channels, model.out_channels, model.input_size, model.num_classes) == (
        4,
        8,
        8,
        10,
    )
    assert model.learn_sigma and UNet(**TINY, learn_sigma=False).out_channels == 4
    # ADM's init: the output conv starts at zero, so the first prediction is exactly 0 (as DiT's adaLN-Zero)
    x, t, y = inputs()
    with torch.no_grad():
        assert torch.equal(model(x, t, y), torch.zeros(4, 8, 8, 8))
    # the null class is always an embedding row (index num_classes), even without label dropout
    assert UNet(**TINY, class_dropout_prob=0.0).unet.class_embedding.num_embeddings == 11


def test_blocks_cover_every_stage():
    model = UNet(**TINY)
    in_blocks = {id(p) for blk in model.blocks for p in blk.parameters()}
    outside = [n for n, p in model.named_parameters() if id(p) not in in_blocks]
    assert outside == [
        "unet.conv_in.weight",
        "unet.conv_in.bias",
        "unet.time_embedding.linear_1.weight",
        "unet.time_embedding.linear_1.bias",
        "unet.time_embedding.linear_2.weight",
        "unet.time_embedding.linear_2.bias",
        "unet.class_embedding.weight",
        "unet.conv_norm_out.weight",
        "unet.conv_norm_out.bias",
        "unet.conv_out.weight",
        "unet.conv_out.bias",
    ]


def test_label_dropout_uses_the_null_class_and_the_global_rng():
    model = tiny_unet(class_dropout_prob=0.5)
    x, t, y = inputs(8)
    torch.manual_seed(3)
    dropped = torch.rand(8) < 0.5  # what the model draws after the same seed
    assert 0 < dropped.sum() < 8
    with torch.no_grad():
        torch.manual_seed(3)
        trained = model.train()(x, t, y)
        expected = model.eval()(x, t, torch.where(dropped, 10, y))
        plain = model(x, t, y)
    torch.testing.assert_close(trained, expected, rtol=0, atol=1e-6)
    assert not torch.allclose(
        plain[dropped], expected[dropped]
    )  # the null class changes the output
    torch.testing.assert_close(plain[~dropped], expected[~dropped], rtol=0, atol=1e-6)


@pytest.mark.parametrize("channels", [None, 3])
def test_guidance_equals_uncond_plus_scale_times_difference(channels):
    """In float64 (the identity holds to rounding, ~1e-12, on any CPU): the null condition is class
    num_classes = 10; guided channels are uncond + s (cond - uncond), the others the cond half's."""
    model = tiny_unet().double().eval()
    x, t, y = inputs(2)
    x, t = x.double(), t.double()
    null, s = torch.full((2,), 10), 4.0
    assert torch.equal(model.null_condition(y)["y"], null)
    with torch.no_grad():
        cond, uncond = model(x, t, y), model(x, t, null)
        out = Guidance.build(model, {"y": y}, s, channels)(model, x, t, {"y": y}, 0.0, 4)
    k = 4 if channels is None else channels
    guided = uncond[:, :k] + s * (cond[:, :k] - uncond[:, :k])
    torch.testing.assert_close(out[:, :k], guided, rtol=0, atol=1e-12)
    torch.testing.assert_close(out[:, k:], cond[:, k:], rtol=0, atol=1e-12)  # unguided: cond half


def test_guided_euler_step_through_the_flow_objective():
    """One Euler step from t=1 to 0 with guidance s: x_0 = x_T - (v_u + s (v_c - v_u)) with v at
    t = 1000; float64, so the identity holds to rounding (1e-12) on any CPU."""
    model = tiny_unet(learn_sigma=False).double().eval()
    x, _, y = inputs(2)
    x = x.double()
    s = 3.0
    out = RectifiedFlow().sample(model, x, {"y": y}, sampler="euler", steps=1, cfg_scale=s)
    with torch.no_grad():
        t = torch.full((2,), 1000.0, dtype=torch.float64)
        v_c, v_u = model(x, t, y), model(x, t, torch.full((2,), 10))
    torch.testing.assert_close(out, x - (v_u + s * (v_c - v_u)), rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "objective,learn_sigma",
    [(GaussianDiffusion(), True), (RectifiedFlow(), False)],
    ids=["ddpm", "flow"],
)
def test_trains_with_each_objective(objective, learn_sigma):
    """15 AdamW steps on a fixed batch, t and noise must cut the objective's loss at least in half."""
    torch.manual_seed(0)
    model = UNet(**TINY, learn_sigma=learn_sigma, class_dropout_prob=0.1).train()
    x, _, y = inputs(4)
    t = torch.tensor([10, 200, 500, 800]) if learn_sigma else torch.tensor([0.2, 0.4, 0.6, 0.8])
    noise = torch.randn(4, 4, 8, 8)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        loss = objective.training_losses(model, {"x": x, "y": y}, t=t, noise=noise)["loss"].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def compose_model(name: str, latent_size: int = 32, channels: int = 4, classes: int = 1000):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            overrides=[
                f"+model={name}",
                f"+data.latent_size={latent_size}",
                f"+data.latent_channels={channels}",
                f"+data.num_classes={classes}",
            ]
        )
    with torch.device("meta"):
        return instantiate(cfg.model)


@pytest.mark.parametrize(
    "name,dit,params",
    [("unet_s", "S", 47_545_032), ("unet_b", "B", 159_392_008), ("unet", "XL", 803_580_488)],
)
def test_configs_match_dit_compute_at_256px(name, dit, params):
    """Each U-Net config costs within 2% of its DiT's forward FLOPs on 4 x 32 x 32 latents."""
    model = compose_model(name)
    with torch.device("meta"):
        reference = build_dit(dit, 2, input_size=32)
    assert isinstance(model, UNet) and sum(v.numel() for v in model.state_dict().values()) == params
    assert abs(model.forward_flops() / reference.forward_flops() - 1) < 0.02


def test_config_follows_the_data():
    model = compose_model("unet_s", latent_size=16, channels=3, classes=7)
    assert (model.input_size, model.in_channels, model.out_channels, model.num_classes) == (
        16,
        3,
        6,
        7,
    )


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(input_size=7), "input_size 7 is not divisible by 2"),
        (
            dict(block_out_channels=(16, 36)),
            r"block_out_channels \[16, 36\] must be multiples of norm_num_groups=8",
        ),
        (dict(attention_levels=(2,)), r"attention_levels \[2\] out of range: levels are 0..1"),
        (dict(attention_head_dim=12), "attention_head_dim 12 must divide"),
        (dict(class_dropout_prob=1.0), r"class_dropout_prob must be in \[0, 1\)"),
    ],
)
def test_bad_sizes_name_the_key(overrides, message):
    with pytest.raises(ValueError, match=message):
        UNet(**{**TINY, **overrides})


def test_quickstart_sizes_each_backbone():
    """`-m model=dit_s,unet_s experiment=quickstart`: each model gets the experiment's size for it
    (conf/experiment_model/quickstart/), both near the same compute on the 16x16x3 digits."""

    def quickstart(model: str):
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose(
                config_name="train", overrides=["experiment=quickstart", f"model={model}"]
            )
        with torch.device("meta"):
            return instantiate(cfg.model)

    dit, unet = quickstart("dit_s"), quickstart("unet_s")
    preset = OmegaConf.load(CONF / "experiment_model/quickstart/dit_s.yaml")
    assert all(getattr(dit, key) == value for key, value in preset.items()), preset
    assert isinstance(unet, UNet) and (unet.input_size, unet.in_channels, unet.out_channels) == (
        16,
        3,
        3,
    )
    assert abs(unet.forward_flops() / dit.forward_flops() - 1) < 0.05


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["flow", "ddpm"])
def test_train_py_trains_the_unet_on_the_quickstart(tmp_path, objective, run_train):
    out = tmp_path / "outputs"
    run_train(
        "experiment=quickstart",
        "model=unet_s",
        f"objective={objective}",
        "trainer.max_steps=3",
        "trainer.log_every_n_steps=1",
        "logger=csv",
        f"paths.output_dir={out}",
        f"paths.data_dir={tmp_path / 'data'}",
        "data.batch_size=8",
        "data.num_workers=0",
        "~callbacks.sample_grid",
        "~callbacks.digits_score",
        "~callbacks.progress",
        "trainer.enable_progress_bar=false",
        timeout=600,
    )
    (metrics,) = out.glob("*/csv/version_0/metrics.csv")
    rows = [line.split(",") for line in metrics.read_text().splitlines()]
    steps = [int(r[rows[0].index("step")]) for r in rows[1:] if r[rows[0].index("train/loss")]]
    assert steps == [0, 1, 2]
    (ckpt,) = out.glob("*/checkpoints/last.ckpt")
    state = torch.load(ckpt, weights_only=True, map_location="cpu")
    assert state["global_step"] == 3
    width = OmegaConf.load(CONF / "experiment_model/quickstart/unet_s.yaml").block_out_channels[0]
    conv_out = [v for k, v in state["state_dict"].items() if k.endswith("unet.conv_out.weight")]
    assert conv_out and all(
        v.shape == (3, width, 3, 3) for v in conv_out
    )  # 3 channels: no learned sigma
    assert all(v.abs().sum() > 0 for v in conv_out)  # trained away from its zero init
