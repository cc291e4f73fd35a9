"""Encoder fixtures: tiny random transformers vision models, saved (nothing downloads).

Registered by tests/conftest.py (pytest_plugins)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

TINY_ENCODER = dict(
    hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
)


def _save_tiny_encoder(
    kind: str, path: str | Path, image_size: int = 8, patch_size: int = 2
) -> str:
    """A tiny random vision model of `kind` (dinov2 | dinov3 | siglip | mae | vit), 16 wide, seeded,
    saved with save_pretrained at `path`; returns the folder (encoder.pretrained=)."""
    import transformers as tf

    torch.manual_seed(0)
    sizes = dict(**TINY_ENCODER, patch_size=patch_size, image_size=image_size)
    if kind == "dinov2":
        net = tf.Dinov2Model(tf.Dinov2Config(**sizes))
    elif kind == "dinov3":
        net = tf.DINOv3ViTModel(tf.DINOv3ViTConfig(**sizes, num_register_tokens=2))
    elif kind == "siglip":
        net = tf.SiglipVisionModel(tf.SiglipVisionConfig(**sizes))
    elif kind == "mae":
        net = tf.ViTMAEModel(tf.ViTMAEConfig(**sizes))
    else:
        net = tf.ViTModel(tf.ViTConfig(**sizes), add_pooling_layer=False)
    net.save_pretrained(path)
    return str(path)


def _uint8_images(n: int = 3, size: int = 8, seed: int = 0) -> torch.Tensor:
    """(n, 3, size, size) uint8 uniform noise from generator `seed`."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)


@pytest.fixture(scope="session")
def save_tiny_encoder():
    """save_tiny_encoder(kind, path, image_size=8, patch_size=2) -> the saved folder."""
    return _save_tiny_encoder


@pytest.fixture(scope="session")
def uint8_images():
    """uint8_images(n=3, size=8, seed=0) -> (n, 3, size, size) uint8."""
    return _uint8_images
