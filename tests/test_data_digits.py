"""Built-in digits (built once, atomically) and the data configs that model configs interpolate."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from hydra import compose, initialize_config_dir
from hydra.errors import InstantiationException
from hydra.utils import instantiate

from ditkit.data.digits import build_digits
from ditkit.data.format import MANIFEST, decode_label

CONF = str(Path(__file__).resolve().parents[1] / "conf")
# np.bincount(sklearn.datasets.load_digits().target)
DIGIT_COUNTS = [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("data")


def compose_train(*overrides):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("train", overrides=list(overrides))


def test_digits_config_builds_the_set_once_and_feeds_pixel_batches(data_dir):
    cfg = compose_train("data=digits", f"paths.data_dir={data_dir}", "data.num_workers=0")
    assert (
        cfg.data.latent_size,
        cfg.data.latent_channels,
        cfg.data.num_classes,
        cfg.data.image_size,
    ) == (16, 3, 10, 16)
    assert (cfg.model.input_size, cfg.model.in_channels, cfg.model.num_classes) == (16, 3, 10)
    dm = instantiate(cfg.data)
    dm.prepare_data()
    root = data_dir / "digits16"
    manifest_mtime = os.stat(root / MANIFEST).st_mtime_ns
    dm.setup()
    assert (
        dm.manifest["num_samples"] == 1797
        and dm.manifest["num_shards"] == 8
        and dm.scale_factor == 1.0
    )
    labels = [
        decode_label(s)
        for s in wds.tariterators.tarfile_samples([{"url": u} for u in dm.shard_urls])
    ]
    assert np.bincount(labels).tolist() == DIGIT_COUNTS  # every digit, once
    batch = next(iter(dm.train_dataloader()))
    latents, labels = batch["x"], batch["y"]
    assert latents.shape == (64, 3, 16, 16) and labels.dtype == torch.int64
    assert (
        latents.min() >= -1.001 and latents.max() <= 1.001
    )  # pixels in [-1, 1] (+ a 3e-7 std draw)
    torch.testing.assert_close(
        latents[:, 0], latents[:, 2], rtol=0, atol=1e-5
    )  # gray replicated to RGB
    assert (
        build_digits(str(root)) == str(root)
        and os.stat(root / MANIFEST).st_mtime_ns == manifest_mtime
    )


def test_a_non_empty_folder_without_manifest_is_not_overwritten(tmp_path):
    (tmp_path / "digits16").mkdir()
    (tmp_path / "digits16" / "mine.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="digits16 exists but holds no manifest.json"):
        build_digits(str(tmp_path / "digits16"))


def test_imagenet_latents_config_reads_any_shard_set(tmp_path, write_latent_shards):
    keys = write_latent_shards(tmp_path / "shards", (4, 4), shape=(4, 8, 8))
    cfg = compose_train(
        "data=imagenet_latents",
        f"data.root={tmp_path / 'shards'}",
        "data.latent_size=8",
        "data.image_size=8",
        "data.num_classes=10",
        "data.batch_size=2",
        "data.num_workers=0",
        "+data.return_keys=true",
    )
    assert cfg.model.input_size == 8 and cfg.model.in_channels == 4
    dm = instantiate(cfg.data)
    assert dm.state_dict() == {}  # nothing to resume before training starts
    loader = dm.train_dataloader()
    assert {k for _ in range(4) for b in loader for k in b["key"]} == set(keys)
    with pytest.raises(InstantiationException, match="exactly one of data.root"):
        instantiate(compose_train("data=imagenet_latents").data)
