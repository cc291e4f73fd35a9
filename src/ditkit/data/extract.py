"""Images -> VAE posterior moments -> latent shards (the engine behind `python -m
data_pipelines.extract_latents`). With the identity VAE (pixel space) the shards hold the uint8
crops themselves (format.PIXELS, manifest "storage": "pixels").

Output shard i holds source job i; rank r of n writes the shards with i % n == r, so the result does
not depend on how many processes wrote it. A shard is written under a temporary name and renamed
when complete, after its record ``.parts/train-XXXXXX.json`` (sample count, skipped files); a rerun
skips complete shards. When every shard is complete, `merge_manifest` writes ``manifest.json`` and
``skipped.txt``.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator
from contextlib import nullcontext
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm import tqdm

from ditkit.checkpoints.atomic import TMP_MARK, AtomicFile, atomic_write
from ditkit.data.format import (
    CROP,
    DTYPE,
    FORMAT,
    IMAGE,
    MANIFEST,
    PIXEL_DTYPE,
    PIXEL_STORAGE,
    PIXELS,
    SKIPPED,
    VERSION,
    DataFormatError,
    encode_pixel_sample,
    encode_sample,
    shard_name,
    tar_writer,
    write_json_atomic,
)
from ditkit.data.images import BadImage, center_crop_arr, to_tensor
from ditkit.data.vae import IDENTITY, vae_info

PARTS = ".parts"
JOB = "job.json"
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class _ShardImages(IterableDataset):
    """Reads the given jobs (each worker a disjoint subset) and yields batches of center-cropped
    images: dicts with ``shard``, ``keys``, ``labels`` (n,), ``images`` (n, 3, S, S) in [-1, 1],
    ``skipped`` [(key, reason)], and ``last`` (True on the final batch of a shard, which may hold no
    images); with keep_images also ``pixels``: the same crops as (S, S, 3) uint8 arrays."""

    def __init__(
        self,
        source: Any,
        jobs: list[tuple[int, Any]],
        image_size: int,
        batch_size: int,
        keep_images: bool = False,
    ) -> None:
        self.source, self.jobs, self.image_size, self.batch_size = (
            source,
            jobs,
            image_size,
            batch_size,
        )
        self.keep_images = keep_images

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        for shard, job in self.jobs[worker::workers]:
            batch = self._empty(shard)
            for key, label, image in self.source.read(job):
                if isinstance(image, BadImage):
                    batch["skipped"].append((key, str(image)))
                    continue
                crop = center_crop_arr(image, self.image_size)
                batch["keys"].append(key)
                batch["labels"].append(label)
                batch["images"].append(to_tensor(crop))
                if self.keep_images:
                    batch["pixels"].append(crop.copy())  # writable: the loader makes it a tensor
                if len(batch["keys"]) == self.batch_size:
                    yield self._collate(batch, last=False)
                    batch = self._empty(shard)
            yield self._collate(batch, last=True)

    @staticmethod
    def _empty(shard: int) -> dict[str, Any]:
        return {"shard": shard, "keys": [], "labels": [], "images": [], "pixels": [], "skipped": []}

    def _collate(self, batch: dict[str, Any], last: bool) -> dict[str, Any]:
        size = self.image_size
        images = torch.stack(batch["images"]) if batch["images"] else torch.empty(0, 3, size, size)
        return {
            **batch,
            "images": images,
            "labels": torch.tensor(batch["labels"], dtype=torch.long),
            "last": last,
        }


class _ShardWriter:
    """One shard being written: a tar under a temporary name, committed by `commit`."""

    def __init__(self, out: str, shard: int) -> None:
        self.path = os.path.join(out, shard_name(shard))
        self.record_path = os.path.join(out, PARTS, shard_name(shard).replace(".tar", ".json"))
        self.target = AtomicFile(self.path)
        self.tar = tar_writer(self.target.file)
        self.num_samples, self.max_label, self.skipped = 0, -1, []

    def write(self, sample: dict[str, Any], label: int) -> None:
        self.tar.write(sample)
        self.num_samples += 1
        self.max_label = max(self.max_label, label)

    def commit(self) -> None:
        self.tar.close()
        record = {
            "num_samples": self.num_samples,
            "max_label": self.max_label,
            "skipped": self.skipped,
        }
        write_json_atomic(self.record_path, record)
        self.target.commit()  # the shard counts as complete only from here on


def _is_complete(out: str, shard: int) -> bool:
    name = shard_name(shard)
    return os.path.isfile(os.path.join(out, name)) and os.path.isfile(
        os.path.join(out, PARTS, name.replace(".tar", ".json"))
    )


def _check_job(out: str, job: dict[str, Any]) -> None:
    """Record what this folder is being filled with; refuse to mix two different extractions."""
    path = os.path.join(out, PARTS, JOB)
    if os.path.isfile(path):
        with open(path) as f:
            previous = json.load(f)
        if previous != job and glob.glob(os.path.join(out, "train-*.tar")):
            changed = sorted(k for k in set(job) | set(previous) if job.get(k) != previous.get(k))
            raise DataFormatError(
                f"out={out} already holds shards of a different extraction (changed: {', '.join(changed)}); "
                "use a new out= folder, or delete this one to start over."
            )
    write_json_atomic(path, job)


def extract_latents(
    source: Any,
    vae: torch.nn.Module,
    out: str,
    image_size: int,
    shard_size: int = 1000,
    batch_size: int = 64,
    precision: str = "fp32",
    num_workers: int = 4,
    rank: int = 0,
    world_size: int = 1,
    device: str | torch.device = "cpu",
    progress: bool = True,
    keep_images: bool = False,
) -> dict[str, int]:
    """Write this rank's missing shards. Returns counts: ``shards`` written, ``samples``,
    ``skipped``. keep_images: also store each crop the VAE encoded as ``image.png`` (what frozen
    vision encoders read for representation alignment)."""
    if image_size % vae.downsample:
        raise ValueError(
            f"image_size={image_size} is not a multiple of the VAE downsampling {vae.downsample}"
        )
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}; choose one of {sorted(PRECISIONS)}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must lie in [0, world_size={world_size})")
    os.makedirs(os.path.join(out, PARTS), exist_ok=True)
    jobs = source.plan(shard_size)
    size = image_size // vae.downsample
    pixels = vae.name == IDENTITY
    _check_job(
        out,
        {
            "num_shards": len(jobs),
            "plan": source.fingerprint(jobs),
            "source": source.describe(),
            "classes": source.classes,
            "num_classes": source.num_classes,
            "vae": vae_info(vae),
            "image_size": image_size,
            "latent_shape": [vae.latent_channels, size, size],
            # Only when set: folders extracted before these options existed keep their job record.
            **({"storage": PIXEL_STORAGE} if pixels else {}),
            **({"keep_images": True} if keep_images else {}),
        },
    )
    pending = [(i, jobs[i]) for i in range(rank, len(jobs), world_size) if not _is_complete(out, i)]
    for i, _ in pending:  # leftovers of an interrupted run
        for stale in glob.glob(os.path.join(out, shard_name(i) + TMP_MARK + "*")):
            os.remove(stale)
    counts = {"shards": 0, "samples": 0, "skipped": 0}
    if not pending:
        return counts

    sizes = [source.size(job) for _, job in pending]
    total = None if None in sizes else sum(sizes)
    dataset = _ShardImages(source, pending, image_size, batch_size, keep_images)
    loader = DataLoader(dataset, batch_size=None, num_workers=min(num_workers, len(pending)))
    vae = vae.to(device)
    dtype = PRECISIONS[precision]
    autocast = torch.autocast(torch.device(device).type, dtype=dtype) if dtype else nullcontext()
    writers: dict[int, _ShardWriter] = {}
    bar = tqdm(
        total=total, unit="img", desc=f"extract rank {rank}/{world_size}", disable=not progress
    )
    for batch in loader:
        shard = batch["shard"]
        writer = writers.get(shard) or writers.setdefault(shard, _ShardWriter(out, shard))
        writer.skipped.extend(batch["skipped"])
        if batch["keys"] and pixels:
            # The crop's pixels back from [-1, 1] (to_tensor's p / 127.5 - 1: exact after
            # rounding); the mirror is their flip, made by the loader.
            crops = ((batch["images"] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
            kept = batch["pixels"] or [None] * len(batch["keys"])  # keep_images: (S, S, 3) uint8
            for j, (key, label) in enumerate(zip(batch["keys"], batch["labels"].tolist())):
                writer.write(encode_pixel_sample(key, label, crops[j], kept[j]), label)
        elif batch["keys"]:
            images = batch["images"].to(device)
            with autocast:
                # One forward for the image and its mirror (the random flip of DiT's training
                # pipeline).
                moments = (
                    vae.encode_moments(torch.cat([images, images.flip(-1)])).float().cpu().numpy()
                )
            n = len(batch["keys"])
            kept = batch["pixels"] or [None] * n  # keep_images: the (S, S, 3) uint8 crops
            for j, (key, label) in enumerate(zip(batch["keys"], batch["labels"].tolist())):
                sample = encode_sample(key, label, moments[j], moments[n + j], kept[j])
                writer.write(sample, label)
        counts["samples"] += len(batch["keys"])
        counts["skipped"] += len(batch["skipped"])
        bar.update(len(batch["keys"]) + len(batch["skipped"]))
        bar.set_postfix(skipped=counts["skipped"], refresh=False)
        if batch["last"]:
            writers.pop(shard).commit()
            counts["shards"] += 1
    bar.close()
    return counts


def _storage(storage: str | None) -> dict[str, Any]:
    """The manifest's description of what each sample stores."""
    if storage == PIXEL_STORAGE:
        return {
            "storage": PIXEL_STORAGE,
            "dtype": PIXEL_DTYPE,
            "fields": {PIXELS: "the crop's pixels (C, H, W); the mirror is its flip"},
        }
    return {
        "dtype": DTYPE,
        "fields": {
            "moments.npy": "mean ‖ logvar, unscaled",
            "moments_flip.npy": "same, mirrored image",
        },
    }


def merge_manifest(out: str) -> dict[str, Any] | None:
    """Write ``manifest.json`` and ``skipped.txt`` if every shard is complete; return the manifest,
    else None."""
    job_path = os.path.join(out, PARTS, JOB)
    if not os.path.isfile(job_path):
        raise FileNotFoundError(f"{job_path} is missing: {out} was not written by extract_latents")
    with open(job_path) as f:
        job = json.load(f)
    if not all(_is_complete(out, i) for i in range(job["num_shards"])):
        return None
    shards, skipped, max_label = [], [], -1
    for i in range(job["num_shards"]):
        with open(os.path.join(out, PARTS, shard_name(i).replace(".tar", ".json"))) as f:
            record = json.load(f)
        shards.append({"name": shard_name(i), "num_samples": record["num_samples"]})
        skipped.extend(record["skipped"])
        max_label = max(max_label, record["max_label"])
    storage = _storage(job.get("storage"))
    images = None
    if job.get("keep_images"):
        storage["fields"][IMAGE] = "the crop the VAE encoded, RGB uint8 PNG"
        images = {"field": IMAGE, "size": job["image_size"], "dtype": "uint8", "crop": CROP}
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "num_samples": sum(s["num_samples"] for s in shards),
        "num_shards": len(shards),
        "num_skipped": len(skipped),
        "shards": shards,
        "latent_shape": job["latent_shape"],
        **storage,
        "images": images,
        "vae": job["vae"],
        "image_size": job["image_size"],
        "crop": CROP,
        "num_classes": job["num_classes"] if job["num_classes"] is not None else max_label + 1,
        "classes": job["classes"],
        "source": job["source"],
    }
    skipped_path = os.path.join(out, SKIPPED)
    with atomic_write(skipped_path, "w") as f:
        f.writelines(f"{key}\t{reason}\n" for key, reason in skipped)
    write_json_atomic(os.path.join(out, MANIFEST), manifest)
    return manifest
