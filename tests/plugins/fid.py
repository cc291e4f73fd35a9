"""FID fixtures: stand-in Inception weights, synthetic image sets, evaluate.py in a fresh process,
and references.

Registered by tests/conftest.py (pytest_plugins)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[2]


def _make_standin_inception_weights(path: str | Path, seed: int = 0) -> Path:
    """Save random Inception-v3 weights in torch-fidelity's layout to `path` and return it.

    torch-fidelity's Inception is built without loading its weights (the loader is patched out), and
    its convolutions are re-initialised with kaiming_normal_: with PyTorch's default init the 2048-d
    features shrink to ~1e-8 and every FID would be ~0, which tests nothing. Likewise the final layer,
    so that the Inception Score is not 1 for every set.
    """
    from unittest import mock

    import torch_fidelity.feature_extractor_inceptionv3 as tf_inception

    with (
        mock.patch.object(tf_inception, "load_state_dict_from_url", return_value={}),
        mock.patch.object(tf_inception.FeatureExtractorInceptionV3, "load_state_dict"),
    ):
        model = tf_inception.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, generator=g)
    # Logits that differ between images (default init: all ~0, so every IS would be 1); zero-mean rows
    # cancel part of what all (non-negative) feature vectors share.
    with torch.no_grad():
        w = torch.randn(model.fc.weight.shape, generator=g)
        model.fc.weight.copy_(w - w.mean(1, keepdim=True))
    path = Path(path)
    torch.save(model.state_dict(), path)
    return path


def _blob_images(n: int, size: int = 32, seed: int = 0) -> np.ndarray:
    """(n, size, size, 3) uint8: smooth random colour blobs, varied enough for a non-degenerate
    covariance."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = np.empty((n, size, size, 3), np.float64)
    for i in range(n):
        cx, cy, r = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.1, 0.4)
        mask = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r**2))[..., None]
        fg, bg = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        out[i] = mask * fg + (1 - mask) * bg
    return out.round().clip(0, 255).astype(np.uint8)


def _write_image_folder(root: str | Path, images: np.ndarray, classes: int = 2) -> Path:
    """images (n, H, W, 3) uint8 -> PNGs in root/class_k/img_i.png (ImageNet's folder layout)."""
    root = Path(root)
    for i, img in enumerate(images):
        d = root / f"class_{i % classes}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(d / f"img_{i:04d}.png")
    return root


def _run_evaluate(
    *overrides: str, check: bool = True, timeout: float = 300
) -> subprocess.CompletedProcess:
    """evaluate.py with these overrides (W&B offline); on failure with check=True, show its output.

    One thread per process whatever the process count: float sums then run in the same order, so runs
    on 1 and 2 processes give bitwise-equal samples (Lightning would give each of 2 processes 1
    thread, 1 process 2).
    """
    env = {
        **os.environ,
        "WANDB_MODE": "offline",
        "PYTHONWARNINGS": "ignore",
        "OMP_NUM_THREADS": "1",
    }
    proc = subprocess.run(
        [sys.executable, str(REPO / "evaluate.py"), *overrides],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"evaluate.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        )
    return proc


def _make_reference(
    root: Path, out: Path, weights: Path, size: int, *extra: str, source: str = "imagefolder"
) -> Path:
    """`python -m data_pipelines.fid_reference source=<source> source.root=<root> ...` through its
    Hydra config, in process."""
    from hydra import compose, initialize_config_dir

    from data_pipelines.fid_reference import build_reference

    overrides = [
        f"source={source}",
        f"source.root={root}",
        f"image_size={size}",
        f"out={out}",
        f"fid.inception_weights={weights}",
        "num_workers=0",
        "device=cpu",
        *extra,
    ]
    with initialize_config_dir(config_dir=str(REPO / "conf" / "fid_reference"), version_base="1.3"):
        build_reference(compose(config_name="fid_reference", overrides=overrides))
    return out


@pytest.fixture(scope="session")
def inception_weights(tmp_path_factory) -> Path:
    """Path of a stand-in Inception weights file (random, informative features), made once per
    session: nothing downloads."""
    return _make_standin_inception_weights(
        tmp_path_factory.mktemp("inception") / "inception-standin.pth"
    )


@pytest.fixture(scope="session")
def blob_images():
    """blob_images(n, size=32, seed=0) -> (n, size, size, 3) uint8 colour blobs."""
    return _blob_images


@pytest.fixture(scope="session")
def write_image_folder():
    """write_image_folder(root, images, classes=2) -> root: PNGs in root/class_k/img_i.png."""
    return _write_image_folder


@pytest.fixture(scope="session")
def run_evaluate():
    """run_evaluate(*overrides, check=True, timeout=300): evaluate.py in a fresh process."""
    return _run_evaluate


@pytest.fixture(scope="session")
def make_reference():
    """make_reference(root, out, weights, size, *extra, source="imagefolder") -> out: an FID
    reference made through data_pipelines.fid_reference's Hydra config, in process."""
    return _make_reference
