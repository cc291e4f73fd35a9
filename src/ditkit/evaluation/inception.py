"""The Inception-v3 feature extractor of torch-fidelity, loaded safely, and a fingerprint of its
weights.

torch-fidelity's `FeatureExtractorInceptionV3` is a port of the TensorFlow graph the FID paper
(Heusel et al. 2017) and the ADM evaluation suite (Dhariwal & Nichol 2021) use, so statistics made
here compare with theirs. It takes uint8 images (N, 3, H, W) of any size and resizes them to 299 px
itself, the way TensorFlow 1.x did.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch_fidelity.feature_extractor_inceptionv3 import (
    URL_INCEPTION_V3,
    FeatureExtractorInceptionV3,
)

from ditkit.offline import WeightsUnavailableError, is_network_error, url_download_hint

FEATURE_EXTRACTOR = "inception-v3-compat"
# 2048-d pool features for FID / KID / precision-recall, 1008 logits without bias for IS
# (torch-fidelity's defaults for these metrics).
POOL, LOGITS = "2048", "logits_unbiased"


def load_inception(
    weights_path: str | None = None,
    device: str | torch.device = "cpu",
    key: str = "fid.inception_weights",
) -> FeatureExtractorInceptionV3:
    """torch-fidelity's Inception-v3 in eval mode on `device`.

    weights_path: a local state-dict file (clusters without internet), or None to use
    torch-fidelity's own download (cached under $TORCH_HOME after the first use); without a network
    that raises `WeightsUnavailableError` naming `key` (the config key of weights_path) and the URL.
    Calling it: `pool, logits = extractor(images_uint8)` with pool (N, 2048) and logits (N, 1008)
    float32.
    """
    if weights_path is not None:
        path = Path(weights_path)
        if not path.is_file():
            raise FileNotFoundError(
                f"{key}={weights_path}: no such file. Pass the path of the Inception weights "
                "(torch-fidelity's weights-inception-2015-12-05-6726825d.pth) or leave it null to "
                "download them."
            )
        # torch-fidelity loads the file with weights_only=False; refuse anything but plain tensors
        # first.
        try:
            torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise ValueError(
                f"{key}={weights_path} is not a plain state-dict file that loads with "
                f"weights_only=True ({type(err).__name__}: {err})."
            ) from err
        weights_path = str(path)
    try:
        extractor = FeatureExtractorInceptionV3(
            FEATURE_EXTRACTOR, [POOL, LOGITS], feature_extractor_weights_path=weights_path
        )
    except RuntimeError as err:
        raise ValueError(f"{key}={weights_path} does not hold Inception-v3 weights: {err}") from err
    except Exception as err:
        if weights_path is None and is_network_error(err):
            raise WeightsUnavailableError(
                "the Inception-v3 weights of torch-fidelity",
                f"{key}=PATH",
                url_download_hint(URL_INCEPTION_V3),
                err,
            ) from err
        raise
    return extractor.to(device)


def inception_fingerprint(extractor: torch.nn.Module) -> str:
    """A short hash of the extractor's final-layer weights: references made with other weights are
    refused."""
    weight = extractor.fc.weight.detach().to("cpu", torch.float32).contiguous()
    return hashlib.sha256(weight.numpy().tobytes()).hexdigest()[:16]


@torch.no_grad()
def inception_features(
    extractor: torch.nn.Module, images: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """images: (N, 3, H, W) uint8 -> pool features (N, 2048) and logits (N, 1008), float32, on the
    images' device."""
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(
            f"Inception takes uint8 images of shape (N, 3, H, W); got {tuple(images.shape)} {images.dtype}"
        )
    device = next(extractor.parameters()).device
    pool, logits = extractor(images.to(device))
    return pool, logits
