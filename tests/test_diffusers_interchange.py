"""diffusers folders in and out (ditkit.checkpoints.to_diffusers / from_diffusers), checked against
diffusers' own classes, built from configs (nothing downloads): bit-for-bit round trips both ways
and forward equality on the same weights and inputs."""

import json

import pytest
import torch
from diffusers import DiTTransformer2DModel, SD3Transformer2DModel
from tiny_diffusers import DIFFUSERS_DIT, DIFFUSERS_SD3, MMDIT, randomize, share_first_embedder

from ditkit.checkpoints import from_diffusers, to_diffusers
from ditkit.checkpoints.diffusers import diffusers_model, read_folder
from ditkit.models import DiT, MMDiT, UNet

# Tolerances. Both implementations run the same float ops on the same weights; they differ only in
# how matmuls are grouped (ditkit's fused QKV vs diffusers' three projections, SDPA kernels) and
# where fp32 upcasts happen (diffusers' RMSNorm computes in fp32). In float64 that leaves ~1e-12
# (unit roundoff 1.1e-16 grown through ~10 matmul/softmax layers of width <= 128 on O(1) values);
# in float32 (roundoff 6e-8) the same growth stays below 1e-6, so 1e-5 (the bar) has margin.
ATOL64, ATOL32 = 1e-10, 1e-5


def _same_state(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def tiny_diffusers_dit(**overrides) -> DiTTransformer2DModel:
    """Learned sigma (8 = 2 x 4 output channels), 1000 classes + the null row, width 32."""
    model = randomize(DiTTransformer2DModel(**{**DIFFUSERS_DIT, **overrides}))
    share_first_embedder(model)
    return model.eval()


def tiny_diffusers_sd3(qk_norm: str | None = None, **overrides) -> SD3Transformer2DModel:
    """8x8 latents, patch 2 (a 4x4 grid) and a 6x6 position table: the crop is exercised, and so
    is diffusers' scaled table (base = sample_size / patch = 4 positions over 6 rows)."""
    config = {**DIFFUSERS_SD3, "qk_norm": qk_norm, **overrides}
    return randomize(SD3Transformer2DModel(**config)).eval()


def tiny_mmdit(qk_norm: bool) -> MMDiT:
    return randomize(MMDiT(**MMDIT, qk_norm=qk_norm)).eval()


def tiny_dit() -> DiT:
    model = DiT(
        input_size=8,
        patch_size=2,
        in_channels=4,
        hidden_size=32,
        depth=2,
        num_heads=2,
        num_classes=1000,
        timestep_freq_shift=1,
    )
    randomize(model)
    return model.eval()


def dit_inputs(dtype):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, 8, 8, generator=gen, dtype=dtype)
    return x, torch.tensor([0, 417, 999]), torch.tensor([3, 999, 1000])  # 1000: the null class


def sd3_inputs(dtype):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, 4, 8, 8, generator=gen, dtype=dtype)
    context = torch.randn(3, 5, 12, generator=gen, dtype=dtype)
    pooled = torch.randn(3, 6, generator=gen, dtype=dtype)
    # The timesteps stay float32 in both precisions: diffusers computes its sinusoidal features in
    # float32 whatever the model's dtype, ditkit in the timesteps' dtype (float64 for exact JVPs).
    return x, torch.tensor([0.0, 381.5, 1000.0]), context, pooled


# --- DiT -------------------------------------------------------------------------------------


def test_dit_round_trip_from_diffusers(tmp_path):
    ref = tiny_diffusers_dit()
    ref.save_pretrained(tmp_path / "in")
    model = from_diffusers(tmp_path / "in")
    assert isinstance(model, DiT) and model.learn_sigma and model.num_classes == 1000
    to_diffusers(model, tmp_path / "out")
    _same_state(read_folder(tmp_path / "in")[1], read_folder(tmp_path / "out")[1])
    config_in = json.loads((tmp_path / "in" / "config.json").read_text())
    config_out = json.loads((tmp_path / "out" / "config.json").read_text())
    drop = ("_diffusers_version", "_use_default_values")
    assert {k: v for k, v in config_in.items() if k not in drop} == {
        k: v for k, v in config_out.items() if k not in drop
    }


def test_dit_round_trip_from_ditkit(tmp_path):
    model = tiny_dit()
    to_diffusers(model, tmp_path)
    _same_state(model.state_dict(), from_diffusers(tmp_path).state_dict())


@pytest.mark.parametrize("dtype,atol", [(torch.float64, ATOL64), (torch.float32, ATOL32)])
def test_dit_forward_equals_diffusers(tmp_path, dtype, atol):
    ref = tiny_diffusers_dit()
    ref.save_pretrained(tmp_path)
    model = from_diffusers(tmp_path).to(dtype)
    ref = DiTTransformer2DModel.from_pretrained(tmp_path).to(dtype)
    x, t, y = dit_inputs(dtype)
    with torch.no_grad():
        expected = ref(x, timestep=t, class_labels=y).sample
        got = model(x, t, y)
    assert expected.abs().max() > 0.1  # a real signal, not zeros on both sides
    torch.testing.assert_close(got, expected, rtol=0, atol=atol)
    # ... and the other way: ditkit's weights in diffusers' class.
    ours = tiny_dit().to(dtype)
    with torch.no_grad():
        torch.testing.assert_close(
            diffusers_model(ours)(x, timestep=t, class_labels=y).sample,
            ours(x, t, y),
            rtol=0,
            atol=atol,
        )


def test_dit_with_diffusers_default_eps_and_legacy_class_name(tmp_path):
    """norm_eps left at diffusers' 1e-5, and `Transformer2DModel` as the class name (the released
    facebook/DiT-XL-2 folders): both import, with the same forward."""
    ref = tiny_diffusers_dit(norm_eps=1e-5)
    ref.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.pop("norm_eps")
    config["_class_name"] = "Transformer2DModel"
    (tmp_path / "config.json").write_text(json.dumps(config))
    model = from_diffusers(tmp_path).double()
    assert model.blocks[0].norm2.eps == 1e-5
    x, t, y = dit_inputs(torch.float64)
    with torch.no_grad():
        expected = ref.double()(x, timestep=t, class_labels=y).sample
        torch.testing.assert_close(model(x, t, y), expected, rtol=0, atol=ATOL64)
    # 1e-5 vs 1e-6 is visible at this precision: the eps is really carried.
    model.blocks[0].norm2.eps = 1e-6
    with torch.no_grad():
        assert (model(x, t, y) - expected).abs().max() > 1e-8


def test_dit_refusals_name_the_key(tmp_path):
    tiny_diffusers_dit(activation_fn="gelu").save_pretrained(tmp_path / "act")
    with pytest.raises(ValueError, match="activation_fn='gelu'"):
        from_diffusers(tmp_path / "act")
    ref = tiny_diffusers_dit()
    with torch.no_grad():
        ref.transformer_blocks[1].norm1.emb.class_embedder.embedding_table.weight.add_(1.0)
    ref.save_pretrained(tmp_path / "emb")
    with pytest.raises(ValueError, match=r"transformer_blocks\.1\.norm1\.emb\.class_embedder"):
        from_diffusers(tmp_path / "emb")
    reference_t = DiT(
        input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=1, num_heads=2
    )
    with pytest.raises(ValueError, match="model.timestep_freq_shift=0"):
        to_diffusers(reference_t, tmp_path / "ref")
    with pytest.raises(ValueError, match="model.qk_norm=true"):
        to_diffusers(DiT(8, 2, 4, 32, 1, 2, qk_norm=True, timestep_freq_shift=1), tmp_path / "qk")


def test_dit_approximate_export_differs_only_in_timestep_frequencies(tmp_path):
    """approximate=True writes a reference-frequency DiT anyway; setting diffusers' time_proj to
    the reference spacing afterwards makes the two forwards equal, so nothing else differs."""
    model = tiny_dit()
    model.t_embedder.freq_shift = 0
    to_diffusers(model, tmp_path, approximate=True)
    ref = DiTTransformer2DModel.from_pretrained(tmp_path).double()
    x, t, y = dit_inputs(torch.float64)
    model = model.double()
    with torch.no_grad():
        assert (ref(x, timestep=t, class_labels=y).sample - model(x, t, y)).abs().max() > 1e-3
        for blk in ref.transformer_blocks:
            blk.norm1.emb.time_proj.downscale_freq_shift = 0
        torch.testing.assert_close(
            ref(x, timestep=t, class_labels=y).sample, model(x, t, y), rtol=0, atol=ATOL64
        )


# --- MMDiT / SD3 -----------------------------------------------------------------------------


@pytest.mark.parametrize("qk_norm", [None, "rms_norm"])
def test_sd3_round_trip_and_forward(tmp_path, qk_norm):
    ref = tiny_diffusers_sd3(qk_norm)
    ref.save_pretrained(tmp_path / "in")
    model = from_diffusers(tmp_path / "in")
    assert isinstance(model, MMDiT) and model.qk_norm == (qk_norm is not None)
    # diffusers' table has positions arange(6) * 4 / 6: import found that formula.
    assert model.pos_embed_base_size == 4
    to_diffusers(model, tmp_path / "out")
    _same_state(read_folder(tmp_path / "in")[1], read_folder(tmp_path / "out")[1])
    for dtype, atol in ((torch.float64, ATOL64), (torch.float32, ATOL32)):
        x, t, context, pooled = sd3_inputs(dtype)
        with torch.no_grad():
            expected = ref.to(dtype)(
                x, encoder_hidden_states=context, pooled_projections=pooled, timestep=t
            ).sample
            got = model.to(dtype)(x, t, context, pooled)
        assert expected.abs().max() > 0.1
        torch.testing.assert_close(got, expected, rtol=0, atol=atol)


@pytest.mark.parametrize("qk_norm", [False, True])
def test_mmdit_round_trip_from_ditkit_and_forward(tmp_path, qk_norm):
    model = tiny_mmdit(qk_norm)
    to_diffusers(model, tmp_path)
    back = from_diffusers(tmp_path, context_len=5)
    assert back.pos_embed_base_size is None  # ditkit's integer-position table came back as such
    _same_state(model.state_dict(), back.state_dict())
    torch.testing.assert_close(back.pos_embed, model.pos_embed, rtol=0, atol=0)
    ref = SD3Transformer2DModel.from_pretrained(tmp_path)
    x, t, context, pooled = sd3_inputs(torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(
            ref(x, encoder_hidden_states=context, pooled_projections=pooled, timestep=t).sample,
            model(x, t, context, pooled),
            rtol=0,
            atol=ATOL32,
        )


@pytest.mark.parametrize("qk_norm", [None, "rms_norm"])
def test_sd35_medium_dual_attention(tmp_path, qk_norm):
    """SD3.5-medium's MMDiT-X layout (a second, image-only attention in the first blocks) round
    trips bit for bit and runs diffusers' forward, with and without QK-norm."""
    ref = tiny_diffusers_sd3(qk_norm, num_layers=3, dual_attention_layers=(0, 1))
    ref.save_pretrained(tmp_path / "in")
    model = from_diffusers(tmp_path / "in")
    assert model.dual_attention_layers == (0, 1)
    to_diffusers(model, tmp_path / "out")
    _same_state(read_folder(tmp_path / "in")[1], read_folder(tmp_path / "out")[1])
    for dtype, atol in ((torch.float64, ATOL64), (torch.float32, ATOL32)):
        x, t, context, pooled = sd3_inputs(dtype)
        with torch.no_grad():
            expected = ref.to(dtype)(
                x, encoder_hidden_states=context, pooled_projections=pooled, timestep=t
            ).sample
            got = model.to(dtype)(x, t, context, pooled)
            # attn2 matters: without it the output moves by far more than the tolerance.
            gates = [blk.image.adaLN_modulation[-1] for blk in model.blocks[:2]]
            saved = [(g.weight[-16:].clone(), g.bias[-16:].clone()) for g in gates]
            for g in gates:
                g.weight[-16:] = 0
                g.bias[-16:] = 0
            assert (model(x, t, context, pooled) - expected).abs().max() > 1e-3
            for g, (w, b) in zip(gates, saved):
                g.weight[-16:], g.bias[-16:] = w, b
        torch.testing.assert_close(got, expected, rtol=0, atol=atol)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sd3_half_precision_folder_imports(tmp_path, dtype):
    """Released SD3 folders are fp16/bf16: the position table is recognised through the rounding,
    and the weights load (as float32) equal to the folder's."""
    ref = tiny_diffusers_sd3("rms_norm").to(dtype)
    ref.save_pretrained(tmp_path)
    model = from_diffusers(tmp_path)
    assert model.pos_embed_base_size == 4
    ours = model.state_dict()
    assert torch.equal(ours["context_embedder.weight"], ref.context_embedder.weight.float())


def test_sd3_refusals_name_the_key(tmp_path):
    ref = tiny_diffusers_sd3()
    with torch.no_grad():
        ref.pos_embed.pos_embed.add_(0.01)  # a learned table
    ref.save_pretrained(tmp_path / "pos")
    with pytest.raises(ValueError, match="pos_embed.pos_embed is not the sin-cos table"):
        from_diffusers(tmp_path / "pos")


# --- U-Net -----------------------------------------------------------------------------------


def test_unet_round_trips(tmp_path):
    model = UNet(
        input_size=8,
        in_channels=4,
        num_classes=10,
        block_out_channels=(16, 32),
        layers_per_block=1,
        attention_levels=(1,),
        attention_head_dim=8,
        norm_num_groups=8,
    )
    randomize(model)
    to_diffusers(model, tmp_path / "a")
    back = from_diffusers(tmp_path / "a")
    _same_state(model.state_dict(), back.state_dict())
    to_diffusers(back, tmp_path / "b")
    _same_state(read_folder(tmp_path / "a")[1], read_folder(tmp_path / "b")[1])


def test_not_a_folder_says_what_is_expected(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        from_diffusers(tmp_path)


def test_dual_attention_flops_are_counted():
    """MMDiT.forward_flops covers the second attention, against torch's FlopCounterMode (the 2%
    slack of tests/test_flops.py: norms and activations are not in the analytic count)."""
    from ditkit.models.flops import count_flops

    model = MMDiT(
        input_size=8,
        patch_size=2,
        in_channels=4,
        depth=3,
        num_heads=2,
        head_dim=16,
        context_dim=24,
        pooled_dim=12,
        context_len=5,
        dual_attention_layers=(0, 1),
    )
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([1.0, 500.0])
    counted = count_flops(model, x, t, torch.randn(2, 5, 24), torch.randn(2, 12))
    assert abs(model.forward_flops(2) / counted - 1) < 0.02
    plain = MMDiT(
        **{
            **dict(
                input_size=8,
                patch_size=2,
                in_channels=4,
                depth=3,
                num_heads=2,
                head_dim=16,
                context_dim=24,
                pooled_dim=12,
                context_len=5,
            )
        }
    )
    assert model.forward_flops(2) > plain.forward_flops(2)
