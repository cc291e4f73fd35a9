"""Test helpers for FID: stand-in Inception weights (nothing downloads) and small synthetic image sets.

Use in a test module:  `from helpers_fid import inception_weights`  (a session fixture: the path of a
stand-in weights file), or call `make_standin_inception_weights(path)` directly.
"""

from __future__ import annotations

from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
import torch_fidelity.feature_extractor_inceptionv3 as tf_inception
from PIL import Image


def make_standin_inception_weights(path: str | Path, seed: int = 0) -> Path:
    """Save random Inception-v3 weights in torch-fidelity's layout to `path` and return it.

    torch-fidelity's Inception is built without loading its weights (the loader is patched out), and
    its convolutions are re-initialised with kaiming_normal_: with PyTorch's default init the 2048-d
    features shrink to ~1e-8 and every FID would be ~0, which tests nothing.
    """
    with mock.patch.object(tf_inception, "load_state_dict_from_url", return_value={}), mock.patch.object(
        tf_inception.FeatureExtractorInceptionV3, "load_state_dict"
    ):
        model = tf_inception.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, generator=g)
    path = Path(path)
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="session")
def inception_weights(tmp_path_factory) -> Path:
    """Path of a stand-in Inception weights file, made once per test session."""
    return make_standin_inception_weights(tmp_path_factory.mktemp("inception") / "inception-standin.pth")


def blob_images(n: int, size: int = 32, seed: int = 0) -> np.ndarray:
    """(n, size, size, 3) uint8: smooth random colour blobs, varied enough for a non-degenerate covariance."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = np.empty((n, size, size, 3), np.float64)
    for i in range(n):
        cx, cy, r = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.1, 0.4)
        mask = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r**2))[..., None]
        fg, bg = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        out[i] = mask * fg + (1 - mask) * bg
    return out.round().clip(0, 255).astype(np.uint8)


def write_image_folder(root: str | Path, images: np.ndarray, classes: int = 2) -> Path:
    """images (n, H, W, 3) uint8 -> PNGs in root/class_k/img_i.png (ImageNet's folder layout)."""
    root = Path(root)
    for i, img in enumerate(images):
        d = root / f"class_{i % classes}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(d / f"img_{i:04d}.png")
    return root
