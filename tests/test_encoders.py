"""Frozen vision encoders (ditkit.models.encoders): loaded with transformers from a save_pretrained
folder (tiny random configs here: nothing downloads), each family's patch tokens equal the library's
own forward with the class token and registers dropped, the preprocessing is REPA's, the encoder is
frozen and outside the module tree, grids are matched or refused naming both, and a hub id that
cannot be fetched fails naming encoder.pretrained=DIR."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from ditkit.models.encoders import ENCODERS, FrozenEncoder, check_grids, match_grid


@pytest.mark.parametrize(
    "name, kind, prefix",
    [
        ("dinov2_b", "dinov2", 1),
        ("dinov3_l", "dinov3", 3),
        ("mae_b", "mae", 1),
        ("siglip2_b", "siglip", 0),
    ],
)
def test_patch_tokens_are_the_library_forward_without_prefix_tokens(
    tmp_path, name, kind, prefix, save_tiny_encoder, uint8_images
):
    enc = FrozenEncoder(name, pretrained=save_tiny_encoder(kind, tmp_path / kind), resolution=8)
    assert (enc.grid, enc.dim, enc.num_prefix) == (4, 16, prefix)
    image = uint8_images()
    feats = enc(image)
    x = enc.preprocess(image)
    with torch.no_grad():
        if kind == "mae":  # the identity shuffle: noise increasing along the tokens
            out = enc.net(pixel_values=x, noise=torch.arange(16.0).expand(3, 16))
            assert torch.equal(out.ids_restore, torch.arange(16).expand(3, 16))
        else:
            out = enc.net(pixel_values=x)
    assert torch.equal(feats.patches, out.last_hidden_state[:, prefix:])
    want_cls = out.pooler_output if kind == "siglip" else out.last_hidden_state[:, 0]
    assert torch.equal(feats.cls, want_cls)
    assert feats.patches.shape == (3, 16, 16) and not feats.patches.requires_grad
    assert not any(p.requires_grad for p in enc.net.parameters())


def test_preprocessing_resizes_bicubic_and_normalises(tmp_path, save_tiny_encoder, uint8_images):
    """By hand: [0, 1], bicubic to the encoder resolution, ImageNet mean / std (REPA's DINOv2)."""
    enc = FrozenEncoder(
        "dinov2_b", pretrained=save_tiny_encoder("dinov2", tmp_path / "d"), resolution=8
    )
    image = uint8_images(2, size=12)
    x = F.interpolate(image.double() / 255, size=(8, 8), mode="bicubic", align_corners=False)
    mean = torch.tensor([0.485, 0.456, 0.406], dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], dtype=torch.float64).view(1, 3, 1, 1)
    # float32 vs float64 of values ~ 1 / 0.225: a few ulps.
    torch.testing.assert_close(enc.preprocess(image).double(), (x - mean) / std, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="uint8"):
        enc.preprocess(image.float())


def test_the_encoder_is_frozen_shared_and_never_a_submodule(tmp_path, save_tiny_encoder):
    enc = FrozenEncoder(
        "dinov2_b", pretrained=save_tiny_encoder("dinov2", tmp_path / "d"), resolution=8
    )
    assert copy.deepcopy(enc) is enc  # the EMA's copy of a term shares its teacher
    holder = torch.nn.Module()
    holder.encoder = enc
    assert list(holder.state_dict()) == []


def test_grids_are_pooled_repeated_or_refused_naming_both(tmp_path, save_tiny_encoder):
    tokens = torch.arange(2 * 16 * 3, dtype=torch.float64).reshape(2, 16, 3)
    pooled = match_grid(tokens, 2)  # 4x4 -> 2x2: the mean of each 2x2 block
    grid = tokens.reshape(2, 4, 4, 3)
    want = grid.reshape(2, 2, 2, 2, 2, 3).mean((2, 4)).reshape(2, 4, 3)
    torch.testing.assert_close(pooled, want, rtol=0, atol=1e-12)
    repeated = match_grid(tokens, 8)  # 4x4 -> 8x8: each token twice in each direction
    assert torch.equal(repeated.reshape(2, 8, 8, 3)[:, ::2, ::2], grid)
    assert torch.equal(repeated.reshape(2, 8, 8, 3)[:, 1::2, 1::2], grid)
    enc = FrozenEncoder(
        "dinov2_b", pretrained=save_tiny_encoder("dinov2", tmp_path / "d"), resolution=8
    )
    check_grids(enc, 2, "test")
    with pytest.raises(ValueError, match=r"4x4 token grid.*3x3 grid.*encoder.resolution=6"):
        check_grids(enc, 3, "test")


def test_unknown_names_and_offline_hub_ids_fail_clearly(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="registered: .*dinov2_b"):
        FrozenEncoder("dinov9")
    with pytest.raises(FileNotFoundError, match="encoder.pretrained"):
        FrozenEncoder("dinov2_b", pretrained=str(tmp_path / "missing"))
    import transformers

    def offline(*args, **kwargs):  # what the hub client raises with no network and no cache
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", offline)
    with pytest.raises(OSError, match="facebook/dinov2-base.*encoder.pretrained=DIR"):
        FrozenEncoder("dinov2_b")
    assert {"dinov2_s", "dinov2_b", "dinov2_l", "dinov3_l", "siglip2_b", "mae_b"} <= set(ENCODERS)
