"""Fixtures shared by the test files.

Most are factory fixtures: session-scoped, each returns the function of the same name, which a test
(or a module- or session-scoped fixture of its own) calls with its arguments, e.g.
`write_synthetic_shards(tmp_path / "shards")`. They are grouped as

- training: `tiny_model`, `tiny_dit` and `tiny_batches` (the same DiT and data in process),
  `write_synthetic_shards`, `data_overrides`, `run_overrides`, `train_cmd`,
  `torchrun_cmd`, `run_train` (train.py in a fresh process);
- data: `tiny_autoencoder`, `synthetic_moments`, `write_latent_shards`, `datamodule_kwargs`,
  `make_image_folder`;
- FID: `inception_weights` (a path), `blob_images`, `write_image_folder`, `run_evaluate`
  (evaluate.py in a fresh process), `make_reference`;
- encoders: `save_tiny_encoder` (a tiny random transformers vision model, saved), `uint8_images`.

The one test helper that is not here is tests/train_callbacks.py: a Lightning callback that train.py
subprocesses build from a Hydra `_target_`, so it must be importable in the child (run_train puts
tests/ on the child's PYTHONPATH); no test module imports it.
"""

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
from PIL import Image

from ditkit.data.format import FORMAT, MANIFEST, VERSION, encode_sample, shard_name
from ditkit.objectives.samplers import register_configs

REPO = Path(__file__).resolve().parents[1]

# A tiny DiT on 8x8x4 latents: fast enough for multi-process tests on 2 CPU cores.
TINY_MODEL = (
    "model=dit_s",
    "model.depth=2",
    "model.hidden_size=32",
    "model.num_heads=2",
)


@pytest.fixture(autouse=True, scope="session")
def sampler_configs():
    """evaluate.py's `sampler` group comes from the sampler registry (ConfigStore), as in the entry
    point; tests that compose evaluate.yaml need it registered."""
    register_configs()


# --- training: tiny synthetic latent shards and train.py command lines ------------------------------


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


# --- data: a tiny AutoencoderKL, latent shard sets, an image folder with bad files -------------------


def _tiny_autoencoder():
    """ECOSYSTEM.md's tiny AutoencoderKL (32 px -> 4x4x4), deterministic weights, no download."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        block_out_channels=[8, 16, 16, 16],
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        latent_channels=4,
        norm_num_groups=4,
        layers_per_block=1,
    ).eval()


def _synthetic_moments(
    index: int, shape=(4, 8, 8), logvar: float = -30.0
) -> tuple[np.ndarray, np.ndarray]:
    """Moments whose mean is the constant `index` (mirror: -index), so a latent tells which sample
    and flip it is."""
    c, h, w = shape
    var = np.full((c, h, w), logvar, dtype=np.float32)
    mean = np.full((c, h, w), float(index), dtype=np.float32)
    return np.concatenate([mean, var]), np.concatenate([-mean, var])


def _write_latent_shards(
    root: Path,
    shard_sizes=(6, 5, 4, 3, 2),
    shape=(4, 8, 8),
    num_classes: int = 10,
    scale: float = 0.5,
    logvar: float = -30.0,
    image_size: int | None = None,
) -> list[str]:
    """A shard set of `synthetic_moments` samples with keys k0000, k0001, ... and label
    index % num_classes. Returns the keys in writing order."""
    root.mkdir(parents=True, exist_ok=True)
    keys, shards, index = [], [], 0
    for s, size in enumerate(shard_sizes):
        with wds.TarWriter(str(root / shard_name(s)), encoder=False) as tar:
            for _ in range(size):
                moments, flip = _synthetic_moments(index, shape, logvar)
                key = f"k{index:04d}"
                tar.write(encode_sample(key, index % num_classes, moments, flip))
                keys.append(key)
                index += 1
        shards.append({"name": shard_name(s), "num_samples": size})
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "num_samples": index,
        "num_shards": len(shards),
        "num_skipped": 0,
        "shards": shards,
        "latent_shape": list(shape),
        "dtype": "float16",
        "vae": {
            "name": "identity",
            "scale_factor": scale,
            "latent_channels": shape[0],
            "downsample": 1,
        },
        "image_size": image_size or shape[1],
        "crop": "adm_center",
        "num_classes": num_classes,
        "classes": None,
        "source": {"type": "synthetic"},
    }
    (root / MANIFEST).write_text(json.dumps(manifest))
    return keys


def _datamodule_kwargs(root: Path, shape=(4, 8, 8), **overrides) -> dict:
    kwargs = dict(
        latent_size=shape[1],
        latent_channels=shape[0],
        num_classes=10,
        image_size=shape[1],
        root=str(root),
        batch_size=2,
        num_workers=0,
        shuffle_buffer=4,
        return_keys=True,
    )
    return {**kwargs, **overrides}


def _make_image_folder(root: Path) -> dict[str, list[str]]:
    """ImageNet-style folder with good images in odd modes and sizes, and undecodable files.
    Returns {"good": [relative paths], "bad": [relative paths]}."""
    rng = np.random.default_rng(0)
    good, bad = [], []

    def rgb(w, h):
        return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))

    files = {
        "cat/rgb.jpg": lambda p: rgb(80, 48).save(p, quality=95),
        "cat/cmyk.jpg": lambda p: rgb(40, 40).convert("CMYK").save(p),
        "cat/big.png": lambda p: rgb(130, 70).save(p),  # box-halved once before the bicubic resize
        "dog/gray.png": lambda p: rgb(36, 50).convert("L").save(p),
        "dog/palette.png": lambda p: rgb(33, 33).convert("P").save(p, transparency=0),
        "dog/alpha.png": lambda p: rgb(32, 32).convert("RGBA").save(p),
        "dog/tiny.png": lambda p: rgb(5, 3).save(p),
        "dog/gray16.png": lambda p: Image.fromarray(
            rng.integers(0, 65536, (34, 34), dtype=np.uint16)
        ).save(p),
    }
    for rel, write in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        write(root / rel)
        good.append(rel)
    whole = (root / "cat/rgb.jpg").read_bytes()
    (root / "cat/truncated.jpg").write_bytes(whole[: len(whole) // 2])
    (root / "cat/empty.png").write_bytes(b"")
    (root / "dog/notes.txt").write_text("not an image")
    (root / "dog/fake.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    bad += ["cat/truncated.jpg", "cat/empty.png", "dog/notes.txt", "dog/fake.png"]
    return {"good": good, "bad": bad}


@pytest.fixture(scope="session")
def tiny_autoencoder():
    """tiny_autoencoder(): a new tiny diffusers AutoencoderKL (32 px -> 4x4x4), seeded, in eval mode."""
    return _tiny_autoencoder


@pytest.fixture(scope="session")
def synthetic_moments():
    """synthetic_moments(index, shape=(4, 8, 8), logvar=-30.0) -> (moments, mirror moments)."""
    return _synthetic_moments


@pytest.fixture(scope="session")
def write_latent_shards():
    """write_latent_shards(root, shard_sizes=(6, 5, 4, 3, 2), shape=(4, 8, 8), num_classes=10,
    scale=0.5, logvar=-30.0, image_size=None) -> the keys, in writing order."""
    return _write_latent_shards


@pytest.fixture(scope="session")
def datamodule_kwargs():
    """datamodule_kwargs(root, shape=(4, 8, 8), **overrides): LatentShardsDataModule arguments."""
    return _datamodule_kwargs


@pytest.fixture(scope="session")
def make_image_folder():
    """make_image_folder(root) -> {"good": [...], "bad": [...]}: images in odd modes, broken files."""
    return _make_image_folder


# --- FID: stand-in Inception weights, synthetic image sets, evaluate.py, references ------------------


def _make_standin_inception_weights(path: str | Path, seed: int = 0) -> Path:
    """Save random Inception-v3 weights in torch-fidelity's layout to `path` and return it.

    torch-fidelity's Inception is built without loading its weights (the loader is patched out), and
    its convolutions are re-initialised with kaiming_normal_: with PyTorch's default init the 2048-d
    features shrink to ~1e-8 and every FID would be ~0, which tests nothing. Likewise the final layer,
    so that the Inception Score is not 1 for every set.
    """
    from unittest import mock

    import torch_fidelity.feature_extractor_inceptionv3 as tf_inception

    with (
        mock.patch.object(tf_inception, "load_state_dict_from_url", return_value={}),
        mock.patch.object(tf_inception.FeatureExtractorInceptionV3, "load_state_dict"),
    ):
        model = tf_inception.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, generator=g)
    # Logits that differ between images (default init: all ~0, so every IS would be 1); zero-mean rows
    # cancel part of what all (non-negative) feature vectors share.
    with torch.no_grad():
        w = torch.randn(model.fc.weight.shape, generator=g)
        model.fc.weight.copy_(w - w.mean(1, keepdim=True))
    path = Path(path)
    torch.save(model.state_dict(), path)
    return path


def _blob_images(n: int, size: int = 32, seed: int = 0) -> np.ndarray:
    """(n, size, size, 3) uint8: smooth random colour blobs, varied enough for a non-degenerate
    covariance."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = np.empty((n, size, size, 3), np.float64)
    for i in range(n):
        cx, cy, r = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.1, 0.4)
        mask = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r**2))[..., None]
        fg, bg = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        out[i] = mask * fg + (1 - mask) * bg
    return out.round().clip(0, 255).astype(np.uint8)


def _write_image_folder(root: str | Path, images: np.ndarray, classes: int = 2) -> Path:
    """images (n, H, W, 3) uint8 -> PNGs in root/class_k/img_i.png (ImageNet's folder layout)."""
    root = Path(root)
    for i, img in enumerate(images):
        d = root / f"class_{i % classes}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(d / f"img_{i:04d}.png")
    return root


def _run_evaluate(
    *overrides: str, check: bool = True, timeout: float = 300
) -> subprocess.CompletedProcess:
    """evaluate.py with these overrides (W&B offline); on failure with check=True, show its output.

    One thread per process whatever the process count: float sums then run in the same order, so runs
    on 1 and 2 processes give bitwise-equal samples (Lightning would give each of 2 processes 1
    thread, 1 process 2).
    """
    env = {
        **os.environ,
        "WANDB_MODE": "offline",
        "PYTHONWARNINGS": "ignore",
        "OMP_NUM_THREADS": "1",
    }
    proc = subprocess.run(
        [sys.executable, str(REPO / "evaluate.py"), *overrides],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"evaluate.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        )
    return proc


def _make_reference(
    root: Path, out: Path, weights: Path, size: int, *extra: str, source: str = "imagefolder"
) -> Path:
    """`python -m data_pipelines.fid_reference source=<source> source.root=<root> ...` through its
    Hydra config, in process."""
    from hydra import compose, initialize_config_dir

    from data_pipelines.fid_reference import build_reference

    overrides = [
        f"source={source}",
        f"source.root={root}",
        f"image_size={size}",
        f"out={out}",
        f"fid.inception_weights={weights}",
        "num_workers=0",
        "device=cpu",
        *extra,
    ]
    with initialize_config_dir(config_dir=str(REPO / "conf" / "fid_reference"), version_base="1.3"):
        build_reference(compose(config_name="fid_reference", overrides=overrides))
    return out


@pytest.fixture(scope="session")
def inception_weights(tmp_path_factory) -> Path:
    """Path of a stand-in Inception weights file (random, informative features), made once per
    session: nothing downloads."""
    return _make_standin_inception_weights(
        tmp_path_factory.mktemp("inception") / "inception-standin.pth"
    )


@pytest.fixture(scope="session")
def blob_images():
    """blob_images(n, size=32, seed=0) -> (n, size, size, 3) uint8 colour blobs."""
    return _blob_images


@pytest.fixture(scope="session")
def write_image_folder():
    """write_image_folder(root, images, classes=2) -> root: PNGs in root/class_k/img_i.png."""
    return _write_image_folder


@pytest.fixture(scope="session")
def run_evaluate():
    """run_evaluate(*overrides, check=True, timeout=300): evaluate.py in a fresh process."""
    return _run_evaluate


@pytest.fixture(scope="session")
def make_reference():
    """make_reference(root, out, weights, size, *extra, source="imagefolder") -> out: an FID
    reference made through data_pipelines.fid_reference's Hydra config, in process."""
    return _make_reference


# --- encoders: tiny random transformers vision models (nothing downloads) ---------------------------

TINY_ENCODER = dict(
    hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
)


def _save_tiny_encoder(
    kind: str, path: str | Path, image_size: int = 8, patch_size: int = 2
) -> str:
    """A tiny random vision model of `kind` (dinov2 | dinov3 | siglip | mae | vit), 16 wide, seeded,
    saved with save_pretrained at `path`; returns the folder (encoder.pretrained=)."""
    import transformers as tf

    torch.manual_seed(0)
    sizes = dict(**TINY_ENCODER, patch_size=patch_size, image_size=image_size)
    if kind == "dinov2":
        net = tf.Dinov2Model(tf.Dinov2Config(**sizes))
    elif kind == "dinov3":
        net = tf.DINOv3ViTModel(tf.DINOv3ViTConfig(**sizes, num_register_tokens=2))
    elif kind == "siglip":
        net = tf.SiglipVisionModel(tf.SiglipVisionConfig(**sizes))
    elif kind == "mae":
        net = tf.ViTMAEModel(tf.ViTMAEConfig(**sizes))
    else:
        net = tf.ViTModel(tf.ViTConfig(**sizes), add_pooling_layer=False)
    net.save_pretrained(path)
    return str(path)


def _uint8_images(n: int = 3, size: int = 8, seed: int = 0) -> torch.Tensor:
    """(n, 3, size, size) uint8 uniform noise from generator `seed`."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)


@pytest.fixture(scope="session")
def save_tiny_encoder():
    """save_tiny_encoder(kind, path, image_size=8, patch_size=2) -> the saved folder."""
    return _save_tiny_encoder


@pytest.fixture(scope="session")
def uint8_images():
    """uint8_images(n=3, size=8, seed=0) -> (n, 3, size, size) uint8."""
    return _uint8_images
