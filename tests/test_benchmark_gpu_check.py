"""benchmarks/gpu_check.sh --dry-run: every step of the GPU check runs on a tiny model on CPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


@pytest.mark.slow
def test_gpu_check_dry_run_prints_every_measurement():
    out = subprocess.run(
        ["bash", "benchmarks/gpu_check.sh", "--dry-run"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, "PY": sys.executable},
    ).stdout
    records = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    steps = [r for r in records if "step_s" in r and r["alignment"] == "none"]
    assert [(r["compile"], r["grad_checkpointing"]) for r in steps] == [
        (False, False),
        (False, True),
    ]
    (repa,) = [r for r in records if "step_s" in r and r["alignment"] == "repa"]
    assert repa["encoder"] == "dinov2_s" and 0 < repa["encoder_share"] < 1
    assert all(r["precision"] == "bf16-mixed" and r["imgs_per_sec"] > 0 for r in steps)
    batches = [r for r in records if "max_batch" in r]
    assert [r["max_batch"] for r in batches] == [4, 4]  # the dry run's cap: limit=4
    ddpm_250, big_batch = [r for r in records if "sampler" in r]
    assert (
        ddpm_250["sampler"] == "ddpm" and ddpm_250["model_evals"] == 3 and ddpm_250["batch"] == 4
    )  # guided: 2N
    assert big_batch["model_evals"] == 2 and big_batch["batch"] == 8
