"""Image decoding and the ADM center crop that DiT's data pipeline uses.

Every decodable image becomes RGB uint8 (CMYK, grayscale, 16-bit, palette and alpha images
included); an undecodable one raises `BadImage`, which the extraction job counts and lists instead
of dying.
"""

from __future__ import annotations

import io
import os

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError


class BadImage(ValueError):
    """A file that is not a decodable image (unreadable, truncated, empty, not an image)."""


def open_rgb(data: bytes | str | os.PathLike) -> Image.Image:
    """Decode a file path or encoded bytes to a fully loaded RGB image; `BadImage` if that is
    impossible."""
    try:
        if isinstance(data, (bytes, bytearray)):
            if len(data) == 0:
                raise BadImage("empty file")
            image = Image.open(io.BytesIO(data))
        else:
            if os.path.getsize(data) == 0:
                raise BadImage("empty file")
            image = Image.open(data)
        image.load()  # decode now: a truncated file fails here, not later in a worker
        return to_rgb(image)
    except BadImage:
        raise
    except (
        UnidentifiedImageError,
        OSError,
        ValueError,
        SyntaxError,
        Image.DecompressionBombError,
    ) as err:
        raise BadImage(f"{type(err).__name__}: {err}") from err


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB. Transparent pixels are composited on white, so they do not turn
    black."""
    if image.mode == "RGB":
        return image
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        # 16-bit / float grayscale: PIL's convert("RGB") clips above 255; rescale to the full 8-bit
        # range.
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I") and array.max() > 255 else max(array.max(), 1.0)
        image = Image.fromarray(np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def center_crop_arr(image: Image.Image, image_size: int) -> np.ndarray:
    """The ADM center crop (Dhariwal & Nichol 2021, guided-diffusion; used by DiT): (S, S, 3) uint8.

    Halve with a box filter while the short side is at least twice the target (cheap, alias-free),
    resize with bicubic so the short side equals ``image_size``, then cut out the center square.
    Tiny images are upscaled by the bicubic step.
    """
    while min(image.size) >= 2 * image_size:
        image = image.resize((image.size[0] // 2, image.size[1] // 2), resample=Image.BOX)
    scale = image_size / min(image.size)
    image = image.resize(
        (round(image.size[0] * scale), round(image.size[1] * scale)), resample=Image.BICUBIC
    )
    array = np.asarray(image)
    top = (array.shape[0] - image_size) // 2
    left = (array.shape[1] - image_size) // 2
    return array[top : top + image_size, left : left + image_size]


def to_tensor(array: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, H, W) float32 in [-1, 1]."""
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div(127.5).sub(1.0)
