"""Helpers for the training tests: tiny synthetic latent shards and train.py command lines."""

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import webdataset as wds

from ditkit.data.format import FORMAT, MANIFEST, VERSION, encode_sample, shard_name
from ditkit.training.ema import local

REPO = Path(__file__).resolve().parents[1]

# A tiny DiT on 8x8x4 latents: fast enough for multi-process tests on 2 CPU cores.
TINY_MODEL = [
    "model=dit_s",
    "model.depth=2",
    "model.hidden_size=32",
    "model.num_heads=2",
]


def write_synthetic_shards(
    root: Path,
    num_samples: int = 64,
    shape=(4, 8, 8),
    num_classes: int = 10,
    num_shards: int = 4,
    seed: int = 0,
) -> Path:
    """A latent shard set of random moments (identity 'VAE', scale 1): manifest.json + train-*.tar."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    c, h, w = shape
    per_shard = num_samples // num_shards
    shards = []
    for s in range(num_shards):
        with wds.TarWriter(str(root / shard_name(s)), encoder=False) as tar:
            for i in range(per_shard):
                mean = rng.standard_normal((c, h, w)).astype(np.float16)
                logvar = np.full((c, h, w), -6.0, dtype=np.float16)
                moments = np.concatenate([mean, logvar])
                flip = np.concatenate([mean[..., ::-1], logvar])
                tar.write(
                    encode_sample(f"s{s}_{i:04d}", int(rng.integers(num_classes)), moments, flip)
                )
        shards.append({"name": shard_name(s), "num_samples": per_shard})
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "num_samples": per_shard * num_shards,
        "num_shards": num_shards,
        "shards": shards,
        "latent_shape": [c, h, w],
        "dtype": "float16",
        "vae": {"name": "identity", "scale_factor": 1.0, "latent_channels": c, "downsample": 1},
        "image_size": h,
        "crop": "adm_center",
        "num_classes": num_classes,
        "classes": None,
        "source": {"type": "synthetic"},
    }
    (root / MANIFEST).write_text(json.dumps(manifest))
    return root


def data_overrides(root: Path, batch_size: int = 4, num_workers: int = 0) -> list[str]:
    """Point data=imagenet_latents at synthetic shards written by write_synthetic_shards."""
    return [
        "data=imagenet_latents",
        f"data.root={root}",
        "data.latent_size=8",
        "data.latent_channels=4",
        "data.num_classes=10",
        "data.image_size=8",
        f"data.batch_size={batch_size}",
        f"data.num_workers={num_workers}",
        "data.shuffle_buffer=16",
    ]


def run_overrides(out: Path, steps: int, every: int) -> list[str]:
    """CPU, CSV logger, every step logged, checkpoints every `every` steps, no sample grid."""
    return [
        "trainer=cpu",
        f"trainer.max_steps={steps}",
        "trainer.log_every_n_steps=1",
        "logger=csv",
        f"paths.output_dir={out}",
        f"callbacks.checkpoint.every_n_train_steps={every}",
        "~callbacks.sample_grid",
        "~callbacks.progress",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
    ]


def train_cmd(*overrides: str) -> list[str]:
    return [sys.executable, str(REPO / "train.py"), *overrides]


def torchrun_cmd(nproc: int, *overrides: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        str(REPO / "train.py"),
        *overrides,
    ]


def run_train(
    *overrides: str,
    timeout: float = 240,
    check: bool = True,
    env=None,
    cmd=None,
    one_thread: bool = True,
) -> subprocess.CompletedProcess:
    """Run train.py (or `cmd`) in a fresh process from the repo root, helpers_training importable (for Hydra
    targets), by default with one intra-op thread per process (2 shared cores); on failure, show its output."""
    env = {
        **os.environ,
        "WANDB_MODE": "offline",
        "PYTHONWARNINGS": "ignore",
        "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]),
        **(env or {}),
    }
    if one_thread:
        env["OMP_NUM_THREADS"] = "1"
    cmd = cmd or train_cmd(*overrides)
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"train.py failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
        )
    return proc


class NaNGradOnRank(L.Callback):
    """Writes a NaN into one local gradient of one rank at one step, after DDP's all-reduce (Hydra builds it
    in train.py subprocesses: +callbacks.nan._target_=helpers_training.NaNGradOnRank): only that rank sees
    the NaN, so the ranks stay in step only if they agree on skipping."""

    def __init__(self, rank: int = 1, step: int = 2):
        self.rank, self.step = rank, step

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_rank == self.rank and trainer.global_step == self.step:
            grad = next(p.grad for p in pl_module.model.parameters() if p.grad is not None)
            local(grad).view(-1)[0] = float("nan")
