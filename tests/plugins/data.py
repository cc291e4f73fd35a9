"""Data fixtures: a tiny AutoencoderKL, latent shard sets, and an image folder with bad files.

Registered by tests/conftest.py (pytest_plugins)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from ditkit.data.format import FORMAT, MANIFEST, VERSION, encode_sample, shard_name


def _tiny_autoencoder():
    """ECOSYSTEM.md's tiny AutoencoderKL (32 px -> 4x4x4), deterministic weights, no download."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        block_out_channels=[8, 16, 16, 16],
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        latent_channels=4,
        norm_num_groups=4,
        layers_per_block=1,
    ).eval()


def _synthetic_moments(
    index: int, shape=(4, 8, 8), logvar: float = -30.0
) -> tuple[np.ndarray, np.ndarray]:
    """Moments whose mean is the constant `index` (mirror: -index), so a latent tells which sample
    and flip it is."""
    c, h, w = shape
    var = np.full((c, h, w), logvar, dtype=np.float32)
    mean = np.full((c, h, w), float(index), dtype=np.float32)
    return np.concatenate([mean, var]), np.concatenate([-mean, var])


def _write_latent_shards(
    root: Path,
    shard_sizes=(6, 5, 4, 3, 2),
    shape=(4, 8, 8),
    num_classes: int = 10,
    scale: float = 0.5,
    logvar: float = -30.0,
    image_size: int | None = None,
) -> list[str]:
    """A shard set of `synthetic_moments` samples with keys k0000, k0001, ... and label
    index % num_classes. Returns the keys in writing order."""
    root.mkdir(parents=True, exist_ok=True)
    keys, shards, index = [], [], 0
    for s, size in enumerate(shard_sizes):
        with wds.TarWriter(str(root / shard_name(s)), encoder=False) as tar:
            for _ in range(size):
                moments, flip = _synthetic_moments(index, shape, logvar)
                key = f"k{index:04d}"
                tar.write(encode_sample(key, index % num_classes, moments, flip))
                keys.append(key)
                index += 1
        shards.append({"name": shard_name(s), "num_samples": size})
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "num_samples": index,
        "num_shards": len(shards),
        "num_skipped": 0,
        "shards": shards,
        "latent_shape": list(shape),
        "dtype": "float16",
        "vae": {
            "name": "identity",
            "scale_factor": scale,
            "latent_channels": shape[0],
            "downsample": 1,
        },
        "image_size": image_size or shape[1],
        "crop": "adm_center",
        "num_classes": num_classes,
        "classes": None,
        "source": {"type": "synthetic"},
    }
    (root / MANIFEST).write_text(json.dumps(manifest))
    return keys


def _datamodule_kwargs(root: Path, shape=(4, 8, 8), **overrides) -> dict:
    kwargs = dict(
        latent_size=shape[1],
        latent_channels=shape[0],
        num_classes=10,
        image_size=shape[1],
        root=str(root),
        batch_size=2,
        num_workers=0,
        shuffle_buffer=4,
        return_keys=True,
    )
    return {**kwargs, **overrides}


def _make_image_folder(root: Path) -> dict[str, list[str]]:
    """ImageNet-style folder with good images in odd modes and sizes, and undecodable files.
    Returns {"good": [relative paths], "bad": [relative paths]}."""
    rng = np.random.default_rng(0)
    good, bad = [], []

    def rgb(w, h):
        return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))

    files = {
        "cat/rgb.jpg": lambda p: rgb(80, 48).save(p, quality=95),
        "cat/cmyk.jpg": lambda p: rgb(40, 40).convert("CMYK").save(p),
        "cat/big.png": lambda p: rgb(130, 70).save(p),  # box-halved once before the bicubic resize
        "dog/gray.png": lambda p: rgb(36, 50).convert("L").save(p),
        "dog/palette.png": lambda p: rgb(33, 33).convert("P").save(p, transparency=0),
        "dog/alpha.png": lambda p: rgb(32, 32).convert("RGBA").save(p),
        "dog/tiny.png": lambda p: rgb(5, 3).save(p),
        "dog/gray16.png": lambda p: Image.fromarray(
            rng.integers(0, 65536, (34, 34), dtype=np.uint16)
        ).save(p),
    }
    for rel, write in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        write(root / rel)
        good.append(rel)
    whole = (root / "cat/rgb.jpg").read_bytes()
    (root / "cat/truncated.jpg").write_bytes(whole[: len(whole) // 2])
    (root / "cat/empty.png").write_bytes(b"")
    (root / "dog/notes.txt").write_text("not an image")
    (root / "dog/fake.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    bad += ["cat/truncated.jpg", "cat/empty.png", "dog/notes.txt", "dog/fake.png"]
    return {"good": good, "bad": bad}


@pytest.fixture(scope="session")
def tiny_autoencoder():
    """tiny_autoencoder(): a new tiny diffusers AutoencoderKL (32 px -> 4x4x4), seeded, in eval mode."""
    return _tiny_autoencoder


@pytest.fixture(scope="session")
def synthetic_moments():
    """synthetic_moments(index, shape=(4, 8, 8), logvar=-30.0) -> (moments, mirror moments)."""
    return _synthetic_moments


@pytest.fixture(scope="session")
def write_latent_shards():
    """write_latent_shards(root, shard_sizes=(6, 5, 4, 3, 2), shape=(4, 8, 8), num_classes=10,
    scale=0.5, logvar=-30.0, image_size=None) -> the keys, in writing order."""
    return _write_latent_shards


@pytest.fixture(scope="session")
def datamodule_kwargs():
    """datamodule_kwargs(root, shape=(4, 8, 8), **overrides): LatentShardsDataModule arguments."""
    return _datamodule_kwargs


@pytest.fixture(scope="session")
def make_image_folder():
    """make_image_folder(root) -> {"good": [...], "bad": [...]}: images in odd modes, broken files."""
    return _make_image_folder
