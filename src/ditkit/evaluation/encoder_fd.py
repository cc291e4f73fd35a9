"""Frechet distance in a frozen vision encoder's feature space (FD-DINOv2 and kin) beside FID.

Stein et al. 2023 ("Exposing flaws of generative model evaluation metrics", NeurIPS) score samples
by the Frechet distance of DINOv2 ViT-L/14 class-token features instead of Inception pool features;
recent papers (REPA-E, RAE, DDT) report it next to FID. Here any registered encoder
(`ditkit.models.encoders.ENCODERS`) can be the feature space: metric `fd_<name>` (`fd_dinov2` is
`fd_dinov2_l`, Stein et al.'s choice), with the encoder's own preprocessing and its class token
(SigLIP: its pooled head) as the feature. Reference statistics come from `data_pipelines.fid_reference
fd_encoders=[dinov2]`, stored in the same .npz as the Inception statistics with the encoder's name,
weights and resolution, so that evaluate.py loads the same encoder and refuses one that differs.
"""

from __future__ import annotations

import torch

from ditkit.models.encoders import ENCODERS, FrozenEncoder

from .stats import FeatureStats, frechet_distance, sqrtm_psd

ALIASES = {"dinov2": "dinov2_l"}  # FD-DINOv2 (Stein et al. 2023): ViT-L/14


def is_fd_metric(metric: str) -> bool:
    return metric.startswith("fd_")


def fd_encoder(metric_or_name: str) -> str:
    """`fd_dinov2` / `dinov2` -> the registry name `dinov2_l`; a clear error for unknown ones."""
    name = metric_or_name.removeprefix("fd_")
    name = ALIASES.get(name, name)
    if name not in ENCODERS:
        valid = sorted({*ALIASES, *ENCODERS})
        raise ValueError(
            f"metric {metric_or_name!r}: no encoder {name!r}; fd_<name> takes one of {valid}"
        )
    return name


class EncoderStats:
    """Streaming class-token statistics of one encoder (exact across ranks, as FeatureStats)."""

    def __init__(self, encoder: FrozenEncoder):
        self.encoder = encoder
        self.stats = FeatureStats(encoder.dim)

    def update(self, images: torch.Tensor) -> None:
        """images: (n, 3, H, W) uint8, on the device the encoder should run on."""
        if images.shape[0]:
            self.stats.update(self.encoder(images).cls)

    def summary(self) -> dict:
        """What a reference file stores for this encoder: mu, sigma, sigma_sqrt and provenance."""
        mu, sigma = self.stats.mean_cov()
        return {
            "mu": mu,
            "sigma": sigma,
            "sigma_sqrt": sqrtm_psd(sigma),
            "pretrained": self.encoder.pretrained,
            "resolution": self.encoder.resolution,
        }

    def distance(self, reference: dict) -> float:
        mu, sigma = self.stats.mean_cov()
        return frechet_distance(
            mu, sigma, reference["mu"], reference["sigma"], reference.get("sigma_sqrt")
        )


def check_encoder_reference(name: str, reference: dict | None, path: str, encoder) -> None:
    """The reference must hold statistics of `name` made at the encoder's resolution."""
    if reference is None:
        raise ValueError(
            f"metric fd_{name}: fid.reference={path} holds no {name} statistics; make it again "
            f"with python -m data_pipelines.fid_reference ... fd_encoders=[{name}]"
        )
    if encoder is not None and int(reference["resolution"]) != encoder.resolution:
        raise ValueError(
            f"fid.reference={path} has {name} statistics at {reference['resolution']} px, the "
            f"encoder runs at {encoder.resolution} px: make the reference again"
        )
