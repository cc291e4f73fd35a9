"""benchmarks/few_step.py on tiny random-weight checkpoints: the right model-call counts per sampler, and
its pixel-space Frechet distance equals the closed form for a shifted copy of the real digits."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ditkit.evaluation.stats import frechet_distance
from ditkit.models import DiT
from ditkit.training.samples import real_digits

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from few_step import pixel_stats  # noqa: E402


def write_checkpoint(path: Path, objective: dict, learn_sigma: bool) -> None:
    """A ditkit checkpoint as train.py writes it: EMA and raw weights plus the run's config."""
    model_cfg = dict(
        _target_="ditkit.models.DiT",
        input_size=8,
        patch_size=4,
        in_channels=3,
        hidden_size=32,
        depth=1,
        num_heads=2,
        num_classes=10,
        learn_sigma=learn_sigma,
    )
    torch.manual_seed(0)
    model = DiT(**{k: v for k, v in model_cfg.items() if k != "_target_"})
    state = {
        f"{prefix}.{k}": v for prefix in ("model", "ema") for k, v in model.state_dict().items()
    }
    torch.save(
        {"state_dict": state, "ditkit_config": {"model": model_cfg, "objective": objective}}, path
    )


def test_counts_model_calls_per_sampler(tmp_path):
    write_checkpoint(
        tmp_path / "flow.ckpt", {"_target_": "ditkit.objectives.RectifiedFlow"}, learn_sigma=False
    )
    write_checkpoint(
        tmp_path / "ddpm.ckpt",
        {"_target_": "ditkit.objectives.GaussianDiffusion", "learn_sigma": True},
        learn_sigma=True,
    )
    args = [
        f"flow_ckpt={tmp_path / 'flow.ckpt'}",
        f"ddpm_ckpt={tmp_path / 'ddpm.ckpt'}",
        "per_class=2",
        "threads=1",
        "settings=ddpm:ddpm:250,ddpm:dpmpp_2m:4,ddpm:unipc:3,flow:heun:5,flow:euler:3,"
        "flow:unipc_flow:4",
    ]
    out = subprocess.run(
        [sys.executable, "benchmarks/few_step.py", *args],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    records = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert [(r["objective"], r["sampler"], r["steps"], r["nfe"]) for r in records] == [
        ("ddpm", "ddpm", 250, 250),
        ("ddpm", "dpmpp_2m", 4, 4),
        ("ddpm", "unipc", 3, 3),
        ("flow", "heun", 5, 10),
        ("flow", "euler", 3, 3),
        ("flow", "unipc_flow", 4, 4),
    ]
    for r in records:
        assert r["num_samples"] == 20 and 0 <= r["accuracy"] <= 1 and r["fd_pixels"] > 0
        assert r["imgs_per_sec"] == pytest.approx(20 / r["seconds"], rel=0.02)


def test_pixel_frechet_distance_of_a_shifted_copy_is_the_squared_shift():
    half = (
        real_digits(16)[0] * 0.5
    )  # in [-0.5, 0.5]: a shift of 0.1 stays clear of the clipping at +-1
    mu, sigma = pixel_stats(half)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0, abs=1e-6)
    # Every one of the 256 grayscale features moves by 0.1; the covariance stays: FD = 256 * 0.1^2.
    mu_shift, sigma_shift = pixel_stats(half + 0.1)
    assert frechet_distance(mu_shift, sigma_shift, mu, sigma) == pytest.approx(2.56, rel=1e-4)
