"""Frechet distance in a vision encoder's space (metrics=[fid,fd_<encoder>]): the reference that
data_pipelines.fid_reference stores equals the class-token statistics computed by hand, the distance
equals the closed form with scipy's sqrtm, bad names and references fail clearly, and evaluate.py
reports it beside FID (slow)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.linalg
import torch

from ditkit.evaluation import InceptionMetrics, load_reference
from ditkit.evaluation.encoder_fd import EncoderStats, check_encoder_reference, fd_encoder
from ditkit.models.encoders import FrozenEncoder

N = 8


@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory, save_tiny_encoder) -> str:
    """A tiny random ViT on 16 px (patch 4: the digits_vit entry's resolution)."""
    return save_tiny_encoder("vit", tmp_path_factory.mktemp("vit") / "vit", 16, 4)


def hand_fd(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance of two feature sets by the closed form (Dowson & Landau), scipy's sqrtm."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def cls_features(encoder: FrozenEncoder, images: np.ndarray) -> np.ndarray:
    """(n, H, W, 3) uint8 -> (n, D) float64 class tokens, straight from the library's forward."""
    x = encoder.preprocess(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous())
    with torch.no_grad():
        return encoder.net(pixel_values=x).last_hidden_state[:, 0].double().numpy()


@pytest.fixture(scope="module")
def reference(
    tmp_path_factory, vit_dir, inception_weights, blob_images, write_image_folder, make_reference
):
    root = tmp_path_factory.mktemp("fdref")
    real = blob_images(N, 32, seed=0)
    write_image_folder(root / "real", real, classes=1)
    path = make_reference(
        root / "real",
        root / "ref.npz",
        inception_weights,
        32,
        "fd_encoders=[digits_vit]",
        f"+fd_pretrained.digits_vit={vit_dir}",
    )
    return path, real


def test_the_reference_holds_the_encoder_statistics_computed_by_hand(reference, vit_dir):
    path, real = reference
    ref = load_reference(path)
    stats = ref.encoders["digits_vit"]
    assert stats["pretrained"] == vit_dir and stats["resolution"] == 16
    feats = cls_features(FrozenEncoder("digits_vit", pretrained=vit_dir), real)
    # float32 features summed in float64: relative 1e-6.
    np.testing.assert_allclose(stats["mu"], feats.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats["sigma"], np.cov(feats, rowvar=False), rtol=1e-5, atol=1e-6)
    assert ref.mu.shape == (2048,)  # the Inception statistics are there as before


def test_the_distance_equals_the_closed_form(reference, vit_dir, blob_images):
    path, real = reference
    ref = load_reference(path)
    encoder = FrozenEncoder("digits_vit", pretrained=vit_dir)
    fake = blob_images(N, 32, seed=1)
    scores = InceptionMetrics(["fd_digits_vit"], {"fd_digits_vit": EncoderStats(encoder)})
    scores.add_images(torch.from_numpy(fake).permute(0, 3, 1, 2), "cpu")
    scores.stats.update(torch.zeros(2, 2048))  # (the Inception part is not asked for)
    out = scores.compute(ref)
    want = hand_fd(cls_features(encoder, fake), cls_features(encoder, real))
    assert want > 1e-3
    # sqrtm of a rank-7 16x16 product: the two routes agree to ~1e-6 relative.
    assert out["fd_digits_vit"] == pytest.approx(want, rel=1e-4, abs=1e-6)


def test_unknown_encoders_and_references_without_statistics_fail_clearly(reference):
    assert fd_encoder("fd_dinov2") == "dinov2_l" and fd_encoder("fd_mae_b") == "mae_b"
    with pytest.raises(ValueError, match="fd_<name> takes one of .*dinov2"):
        fd_encoder("fd_dinov9")
    ref = load_reference(reference[0])
    with pytest.raises(ValueError, match=r"fd_encoders=\[dinov2_l\]"):
        check_encoder_reference("dinov2_l", ref.encoders.get("dinov2_l"), "ref.npz", None)


@pytest.mark.slow
def test_evaluate_reports_fd_beside_fid(
    tmp_path, reference, vit_dir, inception_weights, run_evaluate
):
    """A tiny DiT checkpoint through evaluate.py metrics=[fid,fd_digits_vit]: metrics.json's FD
    equals the closed form on the samples.npz it wrote against the real images."""
    from ditkit.models import DiT

    torch.manual_seed(0)
    model = DiT(
        input_size=32,
        patch_size=8,
        in_channels=3,
        hidden_size=32,
        depth=1,
        num_heads=2,
        num_classes=2,
    )
    torch.save(model.state_dict(), tmp_path / "tiny.pt")
    path, real = reference
    out = tmp_path / "run"
    run_evaluate(
        f"ckpt={tmp_path / 'tiny.pt'}",
        "num_heads=2",
        "vae=identity",
        f"fid.reference={path}",
        f"fid.inception_weights={inception_weights}",
        f"num_samples={N}",
        "batch_size=4",
        "sampler=ddim",
        "sampler.steps=2",
        "accelerator=cpu",
        "progress=false",
        "wandb.enabled=false",
        "metrics=[fid,fd_digits_vit]",
        f"hydra.run.dir={out}",
        timeout=900,  # Inception at 299 px on a shared 2-core CPU
    )
    metrics = json.loads((out / "metrics.json").read_text())
    with np.load(out / "samples.npz") as z:
        samples = z["arr_0"]
    encoder = FrozenEncoder("digits_vit", pretrained=vit_dir)
    want = hand_fd(cls_features(encoder, samples), cls_features(encoder, real))
    assert metrics["fid"] > 0
    assert metrics["fd_digits_vit"] == pytest.approx(want, rel=1e-4)
