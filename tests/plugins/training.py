"""Training fixtures: tiny synthetic latent shards, train.py and torchrun command lines, and the
same tiny DiT and data in process.

Registered by tests/conftest.py (pytest_plugins)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from ditkit.data.format import FORMAT, MANIFEST, VERSION, encode_sample, shard_name

REPO = Path(__file__).resolve().parents[2]

# A tiny DiT on 8x8x4 latents: fast enough for multi-process tests on 2 CPU cores.
TINY_MODEL = (
    "model=dit_s",
    "model.depth=2",
    "model.hidden_size=32",
    "model.num_heads=2",
)


def _write_synthetic_shards(
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


def _data_overrides(root: Path, batch_size: int = 4, num_workers: int = 0) -> list[str]:
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


def _run_overrides(out: Path, steps: int, every: int) -> list[str]:
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


def _train_cmd(*overrides: str) -> list[str]:
    return [sys.executable, str(REPO / "train.py"), *overrides]


def _torchrun_cmd(nproc: int, *overrides: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        str(REPO / "train.py"),
        *overrides,
    ]


def _run_train(
    *overrides: str,
    timeout: float = 240,
    check: bool = True,
    env=None,
    cmd=None,
    one_thread: bool = True,
) -> subprocess.CompletedProcess:
    """Run train.py (or `cmd`) in a fresh process from the repo root, with tests/ on its PYTHONPATH
    (tests/train_callbacks.py, for Hydra targets), by default with one intra-op thread per process
    (2 shared cores); on failure, show its output."""
    env = {
        **os.environ,
        "WANDB_MODE": "offline",
        "PYTHONWARNINGS": "ignore",
        "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]),
        **(env or {}),
    }
    if one_thread:
        env["OMP_NUM_THREADS"] = "1"
    cmd = cmd or _train_cmd(*overrides)
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"train.py failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
        )
    return proc


@pytest.fixture(scope="session")
def tiny_model() -> tuple[str, ...]:
    """Overrides for a tiny DiT on 8x8x4 latents (model=dit_s, depth 2, width 32, 2 heads)."""
    return TINY_MODEL


@pytest.fixture(scope="session")
def write_synthetic_shards():
    """write_synthetic_shards(root, num_samples=64, shape=(4, 8, 8), num_classes=10, num_shards=4,
    seed=0) -> root: random latent moments (identity 'VAE', scale 1), manifest.json + train-*.tar."""
    return _write_synthetic_shards


@pytest.fixture(scope="session")
def data_overrides():
    """data_overrides(root, batch_size=4, num_workers=0): data=imagenet_latents on synthetic shards."""
    return _data_overrides


@pytest.fixture(scope="session")
def run_overrides():
    """run_overrides(out, steps, every): CPU, CSV logger, checkpoints every `every` steps."""
    return _run_overrides


@pytest.fixture(scope="session")
def train_cmd():
    """train_cmd(*overrides): the command line of train.py."""
    return _train_cmd


@pytest.fixture(scope="session")
def torchrun_cmd():
    """torchrun_cmd(nproc, *overrides): train.py under torch.distributed.run --standalone."""
    return _torchrun_cmd


@pytest.fixture(scope="session")
def run_train():
    """run_train(*overrides, timeout=240, check=True, env=None, cmd=None, one_thread=True): train.py
    (or `cmd`) in a fresh process from the repo root; raises with its output if it fails."""
    return _run_train


def _tiny_dit(seed: int = 0, **options):
    """The in-process counterpart of TINY_MODEL: a DiT on 8x8x4 latents, 10 classes, depth 2, width
    32, 2 heads, built after torch.manual_seed(seed)."""
    from ditkit.models import DiT

    torch.manual_seed(seed)
    kwargs = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2)
    return DiT(**{**kwargs, "num_classes": 10, **options})


def _tiny_batches(n: int = 48, seed: int = 0):
    """A TensorDict of n samples {"x": (4, 8, 8) normal, "y": () in [0, 10)} from generator `seed`:
    a plain DataLoader collates them into the batch dicts the shards give."""
    from ditkit.data import TensorDict

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, 8, 8, generator=g)
    return TensorDict({"x": x, "y": torch.randint(0, 10, (n,), generator=g)})


@pytest.fixture(scope="session")
def tiny_dit():
    """tiny_dit(seed=0, **options) -> DiT: the tiny DiT of TINY_MODEL, in process."""
    return _tiny_dit


@pytest.fixture(scope="session")
def tiny_batches():
    """tiny_batches(n=48, seed=0) -> TensorDict of {"x": (4, 8, 8), "y": ()} samples."""
    return _tiny_batches


@pytest.fixture
def one_thread():
    """One intra-op thread for the test, restored after it: small models run faster on one thread
    of a busy 2-core machine, and results do not depend on the thread count. Test files opt in
    with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
