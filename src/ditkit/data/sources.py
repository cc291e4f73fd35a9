"""Image sources for the extraction job: an ImageNet-style folder, image WebDataset shards, built-in
digits.

A source splits its images into *jobs* (one per output shard) and reads a job as a stream of
``(key, label, image)`` where image is an RGB `PIL.Image` or a `BadImage` saying why that file is
unusable. Jobs are plain picklable values, so DataLoader workers can read them in parallel.
"""

from __future__ import annotations

import hashlib
import os
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
from PIL import Image

from ditkit.data.images import BadImage, open_rgb, to_rgb

Record = tuple[str, int, "Image.Image | BadImage"]
IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "ppm", "gif")


def _key(text: str) -> str:
    # WebDataset splits a member name at its first dot (key.field), so a key must not contain one.
    return text.replace(".", "_")


def _fingerprint(items: list) -> str:
    return hashlib.sha256("\n".join(map(str, items)).encode()).hexdigest()[:16]


class ImageFolderSource:
    """ImageNet train layout: ``root/<class folder>/<image files>``; class index = sorted folder
    order.

    Files are shuffled once with ``shuffle_seed`` before they are cut into shards, so that every
    shard mixes all classes (a shuffle buffer over class-sorted shards would see one class at a
    time).
    """

    kind = "imagefolder"

    def __init__(self, root: str, shuffle_seed: int = 0) -> None:
        self.root = os.path.abspath(os.path.expanduser(root))
        if not os.path.isdir(self.root):
            raise FileNotFoundError(
                f"source.root={root!r} is not a folder (expected root/<class>/<images>)"
            )
        self.classes = sorted(
            e.name for e in os.scandir(self.root) if e.is_dir() and not e.name.startswith(".")
        )
        if not self.classes:
            raise FileNotFoundError(
                f"source.root={root!r} has no class folders (expected root/<class>/<images>)"
            )
        self.num_classes = len(self.classes)
        files = []
        for label, name in enumerate(self.classes):
            folder = os.path.join(self.root, name)
            names = sorted(
                e.name for e in os.scandir(folder) if e.is_file() and not e.name.startswith(".")
            )
            files.extend((f"{name}/{f}", label) for f in names)
        if not files:
            raise FileNotFoundError(f"source.root={root!r}: the class folders hold no files")
        random.Random(shuffle_seed).shuffle(files)
        self.files = files
        self.shuffle_seed = shuffle_seed

    def describe(self) -> dict[str, Any]:
        return {"type": self.kind, "root": self.root, "shuffle_seed": self.shuffle_seed}

    def plan(self, shard_size: int) -> list[list[tuple[str, int]]]:
        return [self.files[i : i + shard_size] for i in range(0, len(self.files), shard_size)]

    def fingerprint(self, jobs: list) -> str:
        return _fingerprint(jobs)

    def size(self, job: list[tuple[str, int]]) -> int:
        return len(job)

    def read(self, job: list[tuple[str, int]]) -> Iterator[Record]:
        for relpath, label in job:
            try:
                image = open_rgb(os.path.join(self.root, relpath))
            except BadImage as err:
                image = BadImage(f"{relpath}: {err}")
            yield _key(relpath), label, image


class WebDatasetSource:
    """Image WebDataset shards (``jpg``/``png``/... + ``cls``); one output shard per input shard."""

    kind = "wds"

    def __init__(self, urls: str | list[str], num_classes: int | None = None) -> None:
        import webdataset as wds

        self.urls = wds.shardlists.expand_urls(urls) if isinstance(urls, str) else list(urls)
        if not self.urls:
            raise ValueError(
                "source.urls is empty (give a brace pattern like /data/in-{000000..000146}.tar)"
            )
        self.classes = None
        self.num_classes = num_classes

    def describe(self) -> dict[str, Any]:
        return {"type": self.kind, "urls": self.urls}

    def plan(self, shard_size: int) -> list[str]:
        return list(self.urls)

    def fingerprint(self, jobs: list) -> str:
        return _fingerprint(jobs)

    def size(self, job: str) -> None:
        return None  # unknown until the shard is read

    def read(self, job: str) -> Iterator[Record]:
        import webdataset as wds

        failures: list[Exception] = []

        def note(exn: Exception) -> bool:
            failures.append(exn)
            return True  # keep going after a bad member or a cut-off shard

        for sample in wds.tarfile_to_samples(handler=note)([{"url": job}]):
            key = _key(sample["__key__"])
            field = next((f for f in IMAGE_FIELDS if f in sample), None)
            try:
                if field is None:
                    raise BadImage(f"no image field (one of {', '.join(IMAGE_FIELDS)})")
                if "cls" not in sample:
                    raise BadImage("no cls")
                label = int(sample["cls"].decode("ascii").strip())
                yield key, label, open_rgb(sample[field])
            except (BadImage, ValueError, UnicodeDecodeError) as err:
                yield key, -1, BadImage(f"{job}#{key}: {err}")
        for exn in failures:
            yield f"{_key(os.path.basename(job))}_error", -1, BadImage(f"{job}: {exn}")


class DigitsSource:
    """scikit-learn's handwritten digits (UCI; 1,797 real 8x8 grayscale images, 10 classes), shipped
    with scikit-learn, so it needs no download. Pixels 0..16 are stretched to 0..255."""

    kind = "digits"
    classes = [str(d) for d in range(10)]
    num_classes = 10

    def __init__(self) -> None:
        from sklearn.datasets import load_digits

        digits = load_digits()
        self.images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)  # (1797, 8, 8)
        self.labels = digits.target.astype(np.int64)

    def describe(self) -> dict[str, Any]:
        return {
            "type": self.kind,
            "name": "sklearn.datasets.load_digits",
            "num_images": len(self.labels),
        }

    def plan(self, shard_size: int) -> list[range]:
        n = len(self.labels)
        return [range(i, min(i + shard_size, n)) for i in range(0, n, shard_size)]

    def fingerprint(self, jobs: list) -> str:
        return _fingerprint([(j.start, j.stop) for j in jobs])

    def size(self, job: range) -> int:
        return len(job)

    def read(self, job: range) -> Iterator[Record]:
        for i in job:
            yield f"digits_{i:04d}", int(self.labels[i]), to_rgb(Image.fromarray(self.images[i]))
