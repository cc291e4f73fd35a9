"""The latent shard format (DESIGN.md, "Latent shards"): the contract between data_pipelines and
training.

A dataset is a folder: ``manifest.json`` + ``train-000000.tar``, ``train-000001.tar``, ...
Each sample: ``__key__`` (stable image id), ``cls`` (class index, ASCII), ``moments.npy`` and
``moments_flip.npy`` (float16 [2C, H, W]: VAE posterior mean ‖ log-variance, unscaled, of the image
and of its horizontal mirror). A pixel-space set (identity VAE, manifest ``"storage": "pixels"``)
stores ``pixels.npy`` instead: uint8 [C, H, W], the crop itself, whose mirror is read by flipping it
(exactly what moments_flip holds for the identity: the mirror of the crop). A captioned set
(`ditkit.data.captions`) adds ``txt`` (the caption),
``context.npy`` (float16 [L, D]) and ``pooled.npy`` (float16 [P]): the caption's text embeddings.
Since format version 2 a sample may also carry ``image.png`` (``keep_images=true``): the very ADM
centre crop the VAE encoded, lossless RGB uint8, which frozen vision encoders read in the training
step (representation alignment); the manifest's ``images`` section says so. Version 1 shards (no
images) still load.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping
from typing import Any

import numpy as np

from ditkit.checkpoints.atomic import atomic_write

FORMAT = "ditkit-latent-shards"
VERSION = 2
# Version 2 added the optional image.png field; it changed nothing else, so version 1 reads as is.
READABLE_VERSIONS = (1, 2)
MANIFEST = "manifest.json"
SKIPPED = "skipped.txt"
MOMENTS = "moments.npy"
MOMENTS_FLIP = "moments_flip.npy"
TXT = "txt"
CONTEXT = "context.npy"
POOLED = "pooled.npy"
IMAGE = "image.png"
DTYPE = "float16"
# Pixel-space sets (vae=identity): uint8 pixels, 3 bytes a pixel for image and mirror together
# (256 px: 192 KB), a quarter of the float16 mean and log-variance of the identity "posterior".
PIXELS = "pixels.npy"
PIXEL_STORAGE = "pixels"
PIXEL_DTYPE = "uint8"
CROP = "adm_center"  # ADM / DiT center crop, see ditkit.data.images.center_crop_arr


class DataFormatError(ValueError):
    """A shard set or a sample does not follow the format; the message names the file and the
    fix."""


def shard_name(index: int) -> str:
    return f"train-{index:06d}.tar"


def tar_writer(fileobj: Any) -> Any:
    """A `wds.TarWriter` for shards: a fixed mtime (reruns give identical bytes, and no per-member
    pax header for a float mtime, which doubles the reader's header parsing), pax only where a name
    needs it."""
    import webdataset as wds

    return wds.TarWriter(fileobj, encoder=False, mtime=0, format="PAX_FORMAT")


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def encode_sample(
    key: str,
    label: int,
    moments: np.ndarray,
    moments_flip: np.ndarray,
    image: np.ndarray | None = None,
) -> dict[str, Any]:
    """One sample as a WebDataset dict of bytes. moments, moments_flip: (2C, H, W), stored as
    float16; image: (S, S, 3) uint8, the crop the VAE saw, stored as PNG (lossless)."""
    sample = {
        "__key__": key,
        "cls": str(int(label)).encode("ascii"),
        MOMENTS: npy_bytes(np.asarray(moments, dtype=np.float16)),
        MOMENTS_FLIP: npy_bytes(np.asarray(moments_flip, dtype=np.float16)),
    }
    if image is not None:
        sample[IMAGE] = png_bytes(image)
    return sample


def png_bytes(image: np.ndarray) -> bytes:
    """(S, S, 3) uint8 -> PNG bytes (compression level 1: lossless either way, 3x faster to write
    than PIL's default 6 for 10% more bytes)."""
    from PIL import Image

    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"images are stored as (S, S, 3) uint8, got {image.dtype} {image.shape}")
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def decode_image(sample: Mapping[str, Any], size: int) -> np.ndarray:
    """``image.png`` of a raw sample -> (3, size, size) uint8; `DataFormatError` if missing, not a
    PNG or not that size."""
    from PIL import Image

    raw = sample.get(IMAGE)
    if raw is None:
        raise DataFormatError(f"no {IMAGE}")
    try:
        with Image.open(io.BytesIO(raw)) as png:
            array = np.asarray(png.convert("RGB"))
    except (OSError, ValueError, SyntaxError) as err:
        raise DataFormatError(f"{IMAGE} is not a readable PNG ({err})") from err
    if array.shape != (size, size, 3):
        raise DataFormatError(f"{IMAGE} is {list(array.shape)}, expected {[size, size, 3]}")
    return np.ascontiguousarray(array.transpose(2, 0, 1))


def has_images(manifest: Mapping[str, Any]) -> bool:
    """Whether the shards carry image.png (extracted with keep_images=true)."""
    return bool(manifest.get("images"))


def encode_pixel_sample(
    key: str, label: int, pixels: np.ndarray, image: np.ndarray | None = None
) -> dict[str, Any]:
    """One pixel-space sample: pixels (C, H, W) uint8 (the crop; its mirror is the flip); image:
    (S, S, 3) uint8 for keep_images=true, stored as PNG like a latent set's."""
    if pixels.dtype != np.uint8:
        raise ValueError(f"pixels must be uint8, got {pixels.dtype}")
    sample = {"__key__": key, "cls": str(int(label)).encode("ascii"), PIXELS: npy_bytes(pixels)}
    if image is not None:
        sample[IMAGE] = png_bytes(image)
    return sample


def is_pixel_set(manifest: Mapping[str, Any]) -> bool:
    """True for a set that stores uint8 pixels (``pixels.npy``) rather than moments."""
    return manifest.get("storage") == PIXEL_STORAGE


def decode_pixel_moments(
    sample: Mapping[str, Any], shape: tuple[int, ...], mirror: bool = False
) -> np.ndarray:
    """``pixels.npy`` of a raw sample as identity-VAE moments (2C, H, W) float32: the pixels
    scaled to [-1, 1] (p / 127.5 - 1, the inverse of the extraction's quantisation) and a
    log-variance of -inf, so that the loader's posterior draw is the pixels exactly. mirror: the
    horizontal flip. shape: (2C, H, W), as `moments_shape`."""
    raw = sample.get(PIXELS)
    if raw is None:
        raise DataFormatError(f"no {PIXELS}")
    try:
        pixels = load_npy(raw)
    except (ValueError, OSError, EOFError) as err:
        raise DataFormatError(f"{PIXELS} is not a readable .npy ({err})") from err
    c = shape[0] // 2
    if pixels.shape != (c, *shape[1:]):
        raise DataFormatError(
            f"{PIXELS} has shape {list(pixels.shape)}, expected {[c, *shape[1:]]}"
        )
    if pixels.dtype != np.uint8:
        raise DataFormatError(f"{PIXELS} has dtype {pixels.dtype}, expected {PIXEL_DTYPE}")
    out = np.empty(shape, dtype=np.float32)
    # float32 division then subtraction: bit for bit the extraction's to_tensor (images.py).
    np.divide(
        pixels[..., ::-1] if mirror else pixels, np.float32(127.5), out=out[:c], dtype=np.float32
    )
    out[:c] -= np.float32(1.0)
    out[c:] = -np.inf
    return out


def decode_label(sample: Mapping[str, Any]) -> int:
    """The class index of a raw sample; `DataFormatError` if ``cls`` is missing or not an
    integer."""
    raw = sample.get("cls")
    if raw is None:
        raise DataFormatError("no cls")
    try:
        return int(raw.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError) as err:
        raise DataFormatError(f"cls is not an integer: {raw[:20]!r}") from err


_NPY_HEADERS: dict[bytes, tuple[np.dtype, tuple[int, ...], int]] = {}


def load_npy(raw: bytes) -> np.ndarray:
    """``np.load`` of .npy bytes, ~25x faster on repeats: numpy parses every header with `ast` (the
    largest cost of reading a shard), but all samples of a set share one header, so parse each
    once."""
    if raw[:6] != b"\x93NUMPY" or len(raw) < 12:
        raise ValueError("not a .npy file")
    start = 10 if raw[6] == 1 else 12  # format 1.0: 2-byte header length; 2.0 / 3.0: 4 bytes
    end = start + int.from_bytes(raw[8:start], "little")
    known = _NPY_HEADERS.get(raw[:end])
    if known is None:
        array = np.load(io.BytesIO(raw), allow_pickle=False)
        if array.flags.c_contiguous and len(_NPY_HEADERS) < 64:
            _NPY_HEADERS[raw[:end]] = (array.dtype, array.shape, array.size)
        return array
    dtype, shape, size = known
    return np.frombuffer(raw, dtype=dtype, count=size, offset=end).reshape(shape)


def decode_moments(sample: Mapping[str, Any], field: str, shape: tuple[int, ...]) -> np.ndarray:
    """Decode ``field`` (moments.npy or moments_flip.npy) of a raw sample and check it is ``shape``
    = (2C, H, W)."""
    raw = sample.get(field)
    if raw is None:
        raise DataFormatError(f"no {field}")
    try:
        array = load_npy(raw)
    except (ValueError, OSError, EOFError) as err:
        raise DataFormatError(f"{field} is not a readable .npy ({err})") from err
    if array.shape != tuple(shape):
        raise DataFormatError(f"{field} has shape {list(array.shape)}, expected {list(shape)}")
    if not np.issubdtype(array.dtype, np.floating):
        raise DataFormatError(f"{field} has dtype {array.dtype}, expected {DTYPE}")
    return array


def moments_shape(manifest: Mapping[str, Any]) -> tuple[int, int, int]:
    """(2C, H, W) of the stored moments, from the manifest's latent shape (C, H, W)."""
    c, h, w = manifest["latent_shape"]
    return (2 * c, h, w)


def write_json_atomic(path: str, obj: Any) -> None:
    """Write JSON atomically (`atomic_write`): readers never see half a file."""
    with atomic_write(path, "w") as f:
        json.dump(obj, f, indent=1)


REQUIRED_KEYS = (
    "format",
    "version",
    "num_samples",
    "shards",
    "latent_shape",
    "vae",
    "image_size",
    "num_classes",
)


def parse_manifest(text: str, where: str) -> dict[str, Any]:
    """Parse and check a manifest; `DataFormatError` naming ``where`` if it is not one."""
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataFormatError(
            f"{where} is not valid JSON ({err}); rerun data_pipelines.extract_latents"
        ) from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DataFormatError(
            f"{where} is not a {FORMAT} manifest (written by data_pipelines.extract_latents)"
        )
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    if missing:
        raise DataFormatError(f"{where} lacks {missing}; rerun data_pipelines.extract_latents")
    if manifest["version"] not in READABLE_VERSIONS:
        raise DataFormatError(
            f"{where} has format version {manifest['version']}, this ditkit reads versions "
            f"{list(READABLE_VERSIONS)}"
        )
    return manifest
