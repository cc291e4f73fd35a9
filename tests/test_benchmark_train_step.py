"""benchmarks/train_step.py runs on a tiny model and its JSON is self-consistent (no timing asserted)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from ditkit.models import build_dit

ROOT = Path(__file__).parents[1]


def test_train_step_benchmark_reports_consistent_numbers():
    args = [
        "model=dit_s",
        "batch_size=2",
        "steps=2",
        "warmup=1",
        "depth=1",
        "latent_size=8",
        "precision=bf16-mixed",
        "peak_matmul=256",
    ]
    out = subprocess.run(
        [sys.executable, "benchmarks/train_step.py", *args],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    record = json.loads(out.strip().splitlines()[-1])
    assert (
        record["model"] == "dit_s"
        and record["batch_size"] == 2
        and record["precision"] == "bf16-mixed"
    )
    assert abs(record["imgs_per_sec"] - 2 / record["step_s"]) < 0.02 * record["imgs_per_sec"] + 0.01
    with torch.device("meta"):
        flops = 3 * build_dit("S", 2, input_size=8, depth=1).forward_flops(2)
    assert (
        abs(record["gflops_per_sec"] - flops / record["step_s"] / 1e9)
        < 0.02 * record["gflops_per_sec"] + 0.01
    )
    assert abs(record["mfu"] - record["gflops_per_sec"] / record["peak_gflops"]) < 1e-3
    assert record["mfu_nominal"] is None and record["nominal_peak_gflops"] is None  # no datasheet
    assert record["peak_mem_mb"] > 0
    # warm-up + timed steps; DDPM's hybrid loss on random weights starts near 1 + VLB
    assert len(record["losses"]) == 3 and all(0 < v < 100 for v in record["losses"])


def test_train_step_fp8_on_cpu_fails_before_work_naming_the_fix():
    proc = subprocess.run(
        [sys.executable, "benchmarks/train_step.py", "fp8=true", "compile=true", "depth=1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
    )
    assert proc.returncode != 0 and "module.fp8=false" in proc.stderr


def test_train_step_benchmark_rejects_unknown_arguments():
    proc = subprocess.run(
        [sys.executable, "benchmarks/train_step.py", "modle=dit_s"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0 and "unknown argument 'modle=dit_s'" in proc.stderr
