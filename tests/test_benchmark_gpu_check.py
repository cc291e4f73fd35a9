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
    sampling = [r for r in records if "sampler" in r]
    assert [r["sampler"] for r in sampling] == ["ddpm", "euler", "dpmpp_2m", "unipc_flow"]
    for r in sampling:  # guided: 2N per call; the dry run's steps=3 for every sampler
        assert r["model_evals"] == 3 and r["batch"] == 4 and r["precision"] == "bf16-mixed"
        assert r["fid50k_hours_8gpu"] == pytest.approx(r["fid50k_hours_1gpu"] / 8, rel=1e-4)
    for r in steps + sampling:  # MFU both ways; a CPU has no datasheet peak
        assert r["mfu"] > 0 and r["mfu_nominal"] is None
    (fp8,) = [r for r in records if r.get("skipped") == "fp8"]
    assert "FP8 tensor cores" in fp8["reason"] and "module.fp8=false" in fp8["reason"]
    (profile,) = [r for r in records if "top" in r]
    assert profile["compile"] is False and len(profile["top"]) == 5 and profile["total_ms"] > 0
