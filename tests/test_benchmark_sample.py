"""benchmarks/sample.py on a tiny DiT: one JSON line per sampler with the right step and model-call counts."""

import json
import runpy
import sys
from pathlib import Path

import pytest
import torch

from ditkit.models import DiT

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def run_bench(monkeypatch, capsys, *args):
    monkeypatch.syspath_prepend(str(BENCH))
    monkeypatch.setattr(sys, "argv", ["sample.py", "tiny=true", "repeats=1", "threads=1", *args])
    threads = torch.get_num_threads()
    try:
        runpy.run_path(str(BENCH / "sample.py"), run_name="__main__")
    finally:
        torch.set_num_threads(threads)
    return [
        json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")
    ]


def test_one_line_per_sampler_with_counts(monkeypatch, capsys):
    lines = run_bench(
        monkeypatch, capsys, "num_samples=3", "steps=4", "cfg_scale=4.0", "peak_matmul=256"
    )
    with torch.device("meta"):  # the tiny model of sample.py: depth 2, width 32, 8x8 latents
        tiny = dict(input_size=8, hidden_size=32, depth=2, num_heads=2, num_classes=10)
        flops_of = {
            "plain": DiT(**tiny).forward_flops(6),
            "meanflow": DiT(**tiny, second_time=True).forward_flops(6),  # + the t2 embedder
        }
    assert [r["sampler"] for r in lines] == [
        *("ddpm", "ddim", "dpmpp_2m", "unipc"),
        *("euler", "heun", "sde", "unipc_flow"),
        *("meanflow1", "meanflow2"),
    ]
    assert [r["objective"] for r in lines] == ["ddpm"] * 4 + ["flow"] * 4 + ["meanflow"] * 2
    assert [r["model_evals"] for r in lines] == [4, 4, 4, 4, 4, 8, 4, 4, 4, 4]  # Heun: two a step
    for r in lines:
        forward_flops_per_call = flops_of["meanflow" if r["objective"] == "meanflow" else "plain"]
        assert r["steps"] == 4 and r["batch"] == 6  # guided: cond + null in one batch of 2N
        assert r["latent"] == [4, 8, 8]
        assert r["seconds"] > 0 and r["forward_seconds"] > 0
        assert r["overhead"] == pytest.approx(r["seconds"] / r["forward_seconds"] - 1, abs=1e-3)
        assert r["imgs_per_sec"] == pytest.approx(3 / r["seconds"], rel=1e-3)
        flops = r["model_evals"] * forward_flops_per_call
        assert r["gflops_per_sec"] == pytest.approx(flops / r["seconds"] / 1e9, rel=1e-2, abs=0.01)
        assert r["mfu"] == pytest.approx(r["gflops_per_sec"] / r["peak_gflops"], abs=1e-3)
        assert r["mfu_nominal"] is None  # no datasheet peak on a CPU
        # FID-50K's sampling time at this rate: 50,000 / images/s, and an eighth of it on 8 GPUs
        assert r["fid50k_hours_1gpu"] == pytest.approx(50_000 / r["imgs_per_sec"] / 3600, rel=1e-4)
        assert r["fid50k_hours_8gpu"] == pytest.approx(r["fid50k_hours_1gpu"] / 8, rel=1e-4)


def test_default_steps_come_from_the_sampler_configs(monkeypatch, capsys):
    (heun,) = run_bench(monkeypatch, capsys, "num_samples=2", "samplers=heun", "cfg_scale=1.0")
    assert (
        heun["steps"] == 25 and heun["model_evals"] == 50 and heun["batch"] == 2
    )  # unguided: N only


def test_a_progress_bar_with_an_eta_runs_between_the_results(monkeypatch, capsys):
    """stderr carries a tqdm bar over every recording run and repeat ("2/2 [elapsed<remaining"),
    stdout only the JSON lines."""
    monkeypatch.syspath_prepend(str(BENCH))
    monkeypatch.setattr(
        sys,
        "argv",
        ["sample.py", "tiny=true", "repeats=1", "threads=1", "samplers=ddim", "steps=2"]
        + ["num_samples=2", "peak_matmul=64"],
    )
    threads = torch.get_num_threads()
    try:
        runpy.run_path(str(BENCH / "sample.py"), run_name="__main__")
    finally:
        torch.set_num_threads(threads)
    captured = capsys.readouterr()
    assert "samplers: 100%" in captured.err and "| 2/2 [" in captured.err
    assert "<00:00" in captured.err  # the remaining-time estimate
    assert all(line.startswith("{") for line in captured.out.splitlines())
