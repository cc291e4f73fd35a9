"""FID reference statistics on disk: ditkit's `.npz` (mu, sigma + what they were made from) and ADM
reference batches.

A ditkit reference holds `mu` (2048,) and `sigma` (2048, 2048) float64, `image_size`, `num_images`,
`feature_extractor`, `inception_fingerprint` (hash of the Inception weights used), `source`, and
`sigma_sqrt` (sigma's square root, so that a FID against it costs one eigendecomposition), and
optionally `features` (M, 2048) float32 for KID and precision/recall. The ADM evaluation suite's
reference batches (e.g. VIRTUAL_imagenet256_labeled.npz) hold `mu`/`sigma` (and `arr_0`, the images,
whose shape gives the image size); they are read as they are.
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ditkit.checkpoints.atomic import atomic_write

from .inception import FEATURE_EXTRACTOR, inception_features, inception_fingerprint
from .stats import FeatureStats, frechet_distance, sqrtm_psd

FORMAT_VERSION = 1
ENCODER_KEY = "fd__"  # fd__<encoder>__<mu|sigma|sigma_sqrt|pretrained|resolution>
MAKE_ONE = (
    "make one with `python -m data_pipelines.fid_reference source=... image_size=... out=FILE.npz`"
)


@dataclass
class Reference:
    """mu: (D,), sigma: (D, D) float64; features: (M, D) float32 or None; fingerprint "" when
    unknown (ADM).

    sigma_sqrt: sigma^(1/2), stored by fid_reference so that each FID against it needs one eigvalsh
        only.
    """

    mu: np.ndarray
    sigma: np.ndarray
    image_size: int
    num_images: int
    fingerprint: str
    source: str
    features: np.ndarray | None = None
    sigma_sqrt: np.ndarray | None = None
    # Frechet-distance statistics in vision-encoder spaces (ditkit.evaluation.encoder_fd):
    # {encoder name: {"mu", "sigma", "sigma_sqrt", "pretrained", "resolution"}}.
    encoders: dict[str, dict] = field(default_factory=dict)

    def fid(self, mu: np.ndarray, sigma: np.ndarray) -> float:
        """FID of statistics mu (D,), sigma (D, D) against this reference (its square root made
        once, kept)."""
        if self.sigma_sqrt is None:
            self.sigma_sqrt = sqrtm_psd(self.sigma)
        return frechet_distance(mu, sigma, self.mu, self.sigma, self.sigma_sqrt)


def save_reference(path: str | Path, ref: Reference) -> None:
    """Write `ref` as a ditkit reference `.npz` (parent folders created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    extra = {} if ref.features is None else {"features": np.asarray(ref.features, np.float32)}
    if ref.sigma_sqrt is not None:
        extra["sigma_sqrt"] = np.asarray(ref.sigma_sqrt, np.float64)
    for name, stats in ref.encoders.items():
        extra.update({f"{ENCODER_KEY}{name}__{k}": np.asarray(v) for k, v in stats.items()})
    # An open file keeps np.savez from appending ".npz" to other suffixes.
    with atomic_write(path) as f:
        np.savez(
            f,
            mu=np.asarray(ref.mu, np.float64),
            sigma=np.asarray(ref.sigma, np.float64),
            image_size=ref.image_size,
            num_images=ref.num_images,
            feature_extractor=FEATURE_EXTRACTOR,
            inception_fingerprint=ref.fingerprint,
            source=ref.source,
            ditkit_reference_version=FORMAT_VERSION,
            **extra,
        )


def npz_array_shape(path: str | Path, key: str) -> tuple[int, ...] | None:
    """Shape of `key` in an `.npz` read from its header only (an ADM batch's images are GBs), None
    if absent."""
    with zipfile.ZipFile(path) as zf:
        name = f"{key}.npy"
        if name not in zf.namelist():
            return None
        with zf.open(name) as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, _, _ = np.lib.format.read_array_header_1_0(f)
            else:
                shape, _, _ = np.lib.format.read_array_header_2_0(f)
    return tuple(shape)


def read_adm_reference(path: str | Path, image_size: int | None = None) -> Reference:
    """An ADM reference batch: its `mu`/`sigma` as they are; the image size from `arr_0` (or
    `image_size`)."""
    path = Path(path)
    with np.load(path) as z:
        if "mu" not in z.files or "sigma" not in z.files:
            raise ValueError(
                f"{path} has no `mu`/`sigma` arrays: it is not an ADM reference batch (keys: {z.files})"
            )
        mu, sigma = z["mu"].astype(np.float64), z["sigma"].astype(np.float64)
    shape = npz_array_shape(path, "arr_0")
    size = shape[1] if shape is not None and len(shape) == 4 else None
    if image_size is not None and size is not None and image_size != size:
        raise ValueError(
            f"image_size={image_size} but the ADM batch {path} holds {size} px images; pass image_size={size}"
        )
    size = size if size is not None else image_size
    if size is None:
        raise ValueError(
            f"{path} has no `arr_0` images to read the resolution from: pass image_size="
        )
    return Reference(
        mu,
        sigma,
        int(size),
        int(shape[0]) if shape else 0,
        fingerprint="",
        source=f"adm:{path.name}",
    )


def load_reference(path: str | Path) -> Reference:
    """Read a ditkit reference or an ADM batch, with an error that says what to do when `path` is
    neither."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"fid.reference={path}: no such file; {MAKE_ONE}")
    try:
        z = np.load(path)
    except Exception as err:
        raise ValueError(
            f"fid.reference={path} is not a readable .npz ({err}); {MAKE_ONE}"
        ) from err
    with z:
        if "ditkit_reference_version" not in z.files:
            if "mu" in z.files and "sigma" in z.files:
                return read_adm_reference(path)
            raise ValueError(
                f"fid.reference={path} holds no FID statistics (keys: {z.files}); {MAKE_ONE}"
            )
        if str(z["feature_extractor"]) != FEATURE_EXTRACTOR:
            raise ValueError(
                f"fid.reference={path} was made with {z['feature_extractor']}, not {FEATURE_EXTRACTOR}"
            )
        return Reference(
            mu=z["mu"],
            sigma=z["sigma"],
            image_size=int(z["image_size"]),
            num_images=int(z["num_images"]),
            fingerprint=str(z["inception_fingerprint"]),
            source=str(z["source"]),
            features=z["features"] if "features" in z.files else None,
            sigma_sqrt=z["sigma_sqrt"] if "sigma_sqrt" in z.files else None,
            encoders=_encoder_stats(z),
        )


def _encoder_stats(z) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for key in z.files:
        if key.startswith(ENCODER_KEY):
            name, part = key[len(ENCODER_KEY) :].split("__")
            value = z[key]
            out.setdefault(name, {})[part] = value.item() if value.ndim == 0 else value
    return out


def check_reference(
    ref: Reference, path: str | Path, image_size: int, fingerprint: str | None = None
) -> None:
    """Refuse a reference made at another resolution or (when `fingerprint` is given) with other
    Inception
    weights: its FID would mean nothing."""
    if ref.image_size != image_size:
        raise ValueError(
            f"fid.reference={path} was made from {ref.image_size} px images but the samples are "
            f"{image_size} px; "
            f"make a reference at image_size={image_size} ({MAKE_ONE})"
        )
    if fingerprint is not None and ref.fingerprint and ref.fingerprint != fingerprint:
        raise ValueError(
            f"fid.reference={path} was made with other Inception weights (fingerprint {ref.fingerprint}, now "
            f"{fingerprint}); pass the same fid.inception_weights= as when it was made, or make it again"
        )


def compute_reference(
    batches: Iterable[torch.Tensor],
    extractor: torch.nn.Module,
    *,
    image_size: int,
    source: str,
    total: int,
    features: int = 0,
    seed: int = 0,
    progress: bool = True,
    encoders: dict | None = None,
) -> Reference:
    """Statistics of every image in `batches` ((n, 3, S, S) uint8 each, S = image_size; `total`
    images in all).

    features: keep the pool features of this many images, a seeded random subset, for KID and
        precision/recall. encoders: {name: ditkit.evaluation.encoder_fd.EncoderStats}, fed the same
        images on the extractor's device, for Frechet distances in those feature spaces.
    """
    encoders = dict(encoders or {})
    device = next(extractor.parameters()).device
    keep = np.zeros(total, dtype=bool)
    keep[np.random.default_rng(seed).choice(total, min(features, total), replace=False)] = True
    stats, kept, seen = FeatureStats(), [], 0
    with tqdm(total=total, unit="img", desc="reference features", disable=not progress) as bar:
        for images in batches:
            if images.shape[0] == 0:  # a batch whose files were all undecodable
                continue
            if images.shape[-2:] != (image_size, image_size):
                raise ValueError(
                    f"{source}: got {tuple(images.shape[-2:])} images, expected {image_size} px"
                )
            pool, _ = inception_features(extractor, images)
            pool = pool.cpu()
            for encoder_stats in encoders.values():
                encoder_stats.update(images.to(device))
            stats.update(pool)
            n = pool.shape[0]
            mask = torch.from_numpy(keep[seen : seen + n]) if seen + n <= total else None
            if mask is None:
                raise ValueError(f"{source}: more images than the {total} announced")
            kept.append(pool[mask])
            seen += n
            bar.update(n)
    mu, sigma = stats.mean_cov()
    return Reference(
        mu,
        sigma,
        image_size,
        stats.count,
        inception_fingerprint(extractor),
        source,
        features=torch.cat(kept).numpy() if features else None,
        sigma_sqrt=sqrtm_psd(sigma),
        encoders={name: encoder_stats.summary() for name, encoder_stats in encoders.items()},
    )
