"""fid_reference sources and Inception loading, without running Inception: the images a reference is
made from are exactly the training images, ADM batches are taken as they are, bad weight files are
refused."""

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from data_pipelines.fid_reference import _shard_images, _SourceBatches, build_reference
from ditkit.data.format import FORMAT, MANIFEST, VERSION, encode_sample, shard_name
from ditkit.data.sources import DigitsSource
from ditkit.evaluation import load_inception, load_reference

REPO = Path(__file__).resolve().parents[1]


def test_digits_source_gives_the_pixels_the_quickstart_trains_on():
    from ditkit.training.samples import (
        real_digits,
    )  # the built-in set's images as stored, in [-1, 1]

    batches = _SourceBatches(DigitsSource(), image_size=16, batch_size=500)
    ours = torch.cat([batches[i] for i in range(len(batches))])
    stored, _ = real_digits(16)
    assert ours.dtype == torch.uint8 and ours.shape == (1797, 3, 16, 16)
    np.testing.assert_array_equal(ours.numpy(), np.round((stored + 1) * 127.5).astype(np.uint8))


def test_shards_source_decodes_the_stored_means_back_to_the_images(tmp_path):
    """Pixel-space shards (identity VAE, scale 1): posterior means in float16 decode to the exact
    uint8 images."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, 3, 8, 8), dtype=np.uint8)
    mean = images / 127.5 - 1
    with wds.TarWriter(str(tmp_path / shard_name(0)), encoder=False) as tar:
        for i in range(6):
            moments = np.concatenate([mean[i], np.full_like(mean[i], -30.0)])
            tar.write(encode_sample(f"k{i}", i % 2, moments, moments[:, :, ::-1]))
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "num_samples": 6,
        "shards": [{"name": shard_name(0), "num_samples": 6}],
        "latent_shape": [3, 8, 8],
        "vae": {"name": "identity", "scale_factor": 1.0, "latent_channels": 3, "downsample": 1},
        "image_size": 8,
        "num_classes": 2,
    }
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    cfg = OmegaConf.create(
        {
            "source": {"root": str(tmp_path), "vae": None},
            "image_size": None,
            "batch_size": 4,
            "num_workers": 0,
        }
    )
    batches, total, size, name = _shard_images(cfg, torch.device("cpu"))
    decoded = torch.cat(list(batches))
    assert (total, size) == (6, 8) and name.startswith("shards:")
    np.testing.assert_array_equal(decoded.numpy(), images)
    cfg.image_size = 16
    with pytest.raises(ValueError, match="holds 8 px images; pass image_size=8"):
        _shard_images(cfg, torch.device("cpu"))


def test_adm_source_takes_mu_and_sigma_as_they_are(tmp_path):
    mu, sigma = np.random.rand(2048), np.random.rand(2048, 2048)
    np.savez(
        tmp_path / "VIRTUAL_imagenet64.npz",
        arr_0=np.zeros((3, 64, 64, 3), np.uint8),
        mu=mu,
        sigma=sigma,
    )
    out = tmp_path / "ref.npz"
    with initialize_config_dir(config_dir=str(REPO / "conf" / "fid_reference"), version_base="1.3"):
        cfg = compose(
            config_name="fid_reference",
            overrides=[
                "source=adm",
                f"source.path={tmp_path / 'VIRTUAL_imagenet64.npz'}",
                f"out={out}",
            ],
        )
        build_reference(cfg)
        ref = load_reference(out)
        np.testing.assert_array_equal(ref.mu, mu)
        np.testing.assert_array_equal(ref.sigma, sigma)
        assert (ref.image_size, ref.num_images, ref.fingerprint) == (64, 3, "")
        with pytest.raises(ValueError, match="pass image_size=64"):
            build_reference(
                compose(
                    config_name="fid_reference",
                    overrides=[
                        "source=adm",
                        f"source.path={tmp_path / 'VIRTUAL_imagenet64.npz'}",
                        f"out={out}",
                        "image_size=256",
                    ],
                )
            )
        with pytest.raises(FileNotFoundError, match="source.path"):
            build_reference(
                compose(
                    config_name="fid_reference",
                    overrides=["source=adm", f"source.path={tmp_path / 'x.npz'}", f"out={out}"],
                )
            )


class _Sentinel:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_inception_weights_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="fid.inception_weights=.*no such file"):
        load_inception(str(tmp_path / "missing.pth"))
    evil = tmp_path / "evil.pth"
    evil.write_bytes(pickle.dumps({"fc.weight": _Sentinel(str(tmp_path / "pwned"))}))
    with pytest.raises(ValueError, match="weights_only=True"):
        load_inception(str(evil))
    assert not (tmp_path / "pwned").exists()
    other = tmp_path / "other.pth"
    torch.save({"conv.weight": torch.zeros(1)}, other)
    with pytest.raises(ValueError, match="does not hold Inception-v3 weights"):
        load_inception(str(other))
