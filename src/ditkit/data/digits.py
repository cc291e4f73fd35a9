"""The built-in data set: scikit-learn's digits as pixel-space shards, built once into the data
folder."""

from __future__ import annotations

import os
import shutil

from ditkit.data.extract import extract_latents, merge_manifest
from ditkit.data.format import MANIFEST
from ditkit.data.sources import DigitsSource
from ditkit.data.vae import IdentityVAE

# 1,797 images in shards of 256: 8 shards, enough for 2 ranks x 2 workers to split a validation
# pass.
DIGITS_SHARD_SIZE = 256


def build_digits(root: str, image_size: int = 16, progress: bool = True) -> str:
    """Write the digits (upscaled to ``image_size``, RGB, identity VAE) as a shard set at ``root``,
    unless one is there already, with the images beside the pixels (``keep_images``: what frozen
    encoders read, e.g. the digits demo's teacher). Built in a temporary folder and renamed, so a
    crash or a second process never leaves a half-built set behind. Returns ``root``."""
    root = os.path.abspath(os.path.expanduser(root))
    if os.path.isfile(os.path.join(root, MANIFEST)):
        return root
    if os.path.exists(root) and os.listdir(root):
        raise FileExistsError(
            f"{root} exists but holds no {MANIFEST}; delete it or point data.root elsewhere"
        )
    os.makedirs(os.path.dirname(root), exist_ok=True)
    tmp = f"{root}.building-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    extract_latents(
        DigitsSource(),
        IdentityVAE(),
        tmp,
        image_size=image_size,
        shard_size=DIGITS_SHARD_SIZE,
        batch_size=256,
        num_workers=0,
        progress=progress,
        keep_images=True,
    )
    merge_manifest(tmp)
    return publish(tmp, root)


def publish(tmp: str, root: str) -> str:
    """Move a finished data set folder `tmp` to `root` atomically (an empty `root` may be replaced).
    If another process published first, keep its copy, which holds the same data."""
    try:
        if os.path.isdir(root) and not os.listdir(root):
            os.rmdir(root)
        os.rename(tmp, root)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not os.path.isfile(os.path.join(root, MANIFEST)):
            raise
    return root
