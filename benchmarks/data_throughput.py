"""Throughput of LatentShardsDataModule against a bare tarfile + np.load loop over the same shards.

    python benchmarks/data_throughput.py                       # synthetic ImageNet-256 latents (4x32x32)
    python benchmarks/data_throughput.py root=/data/in256-latents batches=200 workers=[0,1,2,4]
    python benchmarks/data_throughput.py quick=true            # a few seconds (what the test runs)

Prints one JSON line per loader (samples_per_sec, ratio_to_bare) and a last summary line.
The datamodule's lines are steady-state: the first `warmup` batches (worker start-up, shuffle-buffer
fill) are not timed. Target: 1 worker >= 0.7 of the bare loop (it also decodes, picks a flip and
draws the posterior sample), 2 workers above it.
"""

from __future__ import annotations

import io
import itertools
import json
import os
import tarfile
import tempfile
import time

import numpy as np
from omegaconf import OmegaConf

from ditkit.data import LatentShardsDataModule
from ditkit.data.format import FORMAT, MANIFEST, VERSION, encode_sample, shard_name, tar_writer

DEFAULTS = dict(
    root=None,
    samples=2048,
    shard_size=256,
    batch_size=64,
    batches=40,
    warmup=2,
    workers=[0, 1, 2],
    shuffle_buffer=1000,
    quick=False,
)
QUICK = dict(
    samples=96, shard_size=32, batch_size=8, batches=4, warmup=1, workers=[0, 1], shuffle_buffer=16
)
SHAPE = (4, 32, 32)  # ImageNet 256 px through the SD VAE


def write_synthetic(root: str, samples: int, shard_size: int, num_classes: int = 1000) -> None:
    """Random moments of ImageNet-256 shape: manifest.json + train-*.tar."""
    rng = np.random.default_rng(0)
    os.makedirs(root, exist_ok=True)
    shards = []
    for s, start in enumerate(range(0, samples, shard_size)):
        count = min(shard_size, samples - start)
        with tar_writer(os.path.join(root, shard_name(s))) as tar:
            for i in range(start, start + count):
                mean = rng.standard_normal(SHAPE, dtype=np.float32)
                moments = np.concatenate([mean, np.full(SHAPE, -2.0, np.float32)])
                flip = np.concatenate([mean[..., ::-1], moments[4:]])
                tar.write(
                    encode_sample(f"img{i:07d}", int(rng.integers(num_classes)), moments, flip)
                )
        shards.append({"name": shard_name(s), "num_samples": count})
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "num_samples": samples,
        "num_shards": len(shards),
        "num_skipped": 0,
        "shards": shards,
        "latent_shape": list(SHAPE),
        "dtype": "float16",
        "vae": {
            "name": "synthetic",
            "scale_factor": 0.18215,
            "latent_channels": 4,
            "downsample": 8,
        },
        "image_size": 256,
        "crop": "adm_center",
        "num_classes": num_classes,
        "classes": None,
        "source": {"type": "synthetic"},
    }
    with open(os.path.join(root, MANIFEST), "w") as f:
        json.dump(manifest, f)


def bare_loop(paths: list[str], samples: int) -> float:
    """samples/s of reading `samples` samples with tarfile + np.load (moments.npy and cls), no
    batching."""
    done, start = 0, time.perf_counter()
    for path in itertools.cycle(paths):
        with tarfile.open(path) as tar:
            for member in tar:
                data = tar.extractfile(member).read()
                if member.name.endswith(".moments.npy"):
                    np.load(io.BytesIO(data)).astype(np.float32)
                    done += 1
                elif member.name.endswith(".cls"):
                    int(data)
                if done == samples:
                    return samples / (time.perf_counter() - start)
    raise ValueError("no shards")


def datamodule_rate(root: str, manifest: dict, cfg, workers: int) -> float:
    """Steady-state samples/s of the training stream with `workers` DataLoader workers."""
    c, size, _ = manifest["latent_shape"]
    dm = LatentShardsDataModule(
        latent_size=size,
        latent_channels=c,
        num_classes=manifest["num_classes"],
        image_size=manifest["image_size"],
        root=root,
        batch_size=cfg.batch_size,
        num_workers=workers,
        shuffle_buffer=cfg.shuffle_buffer,
        samples_per_epoch=(cfg.warmup + cfg.batches) * cfg.batch_size,
    )
    iterator = iter(dm.train_dataloader())
    for _ in range(cfg.warmup):
        next(iterator)
    start = time.perf_counter()
    for _ in range(cfg.batches):
        next(iterator)
    return cfg.batches * cfg.batch_size / (time.perf_counter() - start)


def main() -> None:
    cli = OmegaConf.from_cli()
    cfg = OmegaConf.merge(DEFAULTS, QUICK if cli.get("quick") else {}, cli)
    with tempfile.TemporaryDirectory() as tmp:
        root = cfg.root
        if root is None:
            root = os.path.join(tmp, "latents")
            write_synthetic(root, cfg.samples, cfg.shard_size)
        with open(os.path.join(root, MANIFEST)) as f:
            manifest = json.load(f)
        paths = [os.path.join(root, s["name"]) for s in manifest["shards"]]
        total = cfg.batches * cfg.batch_size
        bare = bare_loop(paths, total)
        results = {"bare": bare}
        print(
            json.dumps(
                {"bench": "data_throughput", "loader": "bare", "samples_per_sec": round(bare, 1)}
            ),
            flush=True,
        )
        for workers in cfg.workers:
            rate = datamodule_rate(root, manifest, cfg, workers)
            results[f"workers_{workers}"] = rate
            print(
                json.dumps(
                    {
                        "bench": "data_throughput",
                        "loader": "datamodule",
                        "num_workers": workers,
                        "samples_per_sec": round(rate, 1),
                        "ratio_to_bare": round(rate / bare, 3),
                    }
                ),
                flush=True,
            )
    print(
        json.dumps(
            {
                "bench": "data_throughput",
                "summary": True,
                "batch_size": cfg.batch_size,
                "samples_timed": total,
                "latent_shape": manifest["latent_shape"],
                "cpu_count": os.cpu_count(),
                **{f"{k}_samples_per_sec": round(v, 1) for k, v in results.items()},
                **{f"ratio_{k}": round(v / bare, 3) for k, v in results.items() if k != "bare"},
            }
        )
    )


if __name__ == "__main__":
    main()
