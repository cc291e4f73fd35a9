"""benchmarks/profile_step.py: the kernel table's arithmetic on known events, and a run on a tiny
model whose table is consistent with its total."""

import json
import runpy
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def test_kernel_table_ranks_by_self_time_per_step(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    from profile_step import kernel_table

    def event(key, cpu_us, cuda_us, count):
        return SimpleNamespace(
            key=key, self_cpu_time_total=cpu_us, self_device_time_total=cuda_us, count=count
        )

    events = [event("mm", 100, 6000, 8), event("softmax", 900, 2000, 4), event("idle", 5, 0, 2)]
    total, table = kernel_table(events, "cuda", steps=2, top=5)
    # device time: 6 ms + 2 ms over 2 steps = 4 ms per step; idle (0 device time) is dropped
    assert total == pytest.approx(4.0)
    assert table == [
        dict(name="mm", ms=3.0, share=0.75, calls=4.0),
        dict(name="softmax", ms=1.0, share=0.25, calls=2.0),
    ]
    total, table = kernel_table(events, "cpu", steps=1, top=1)  # CPU: self CPU time
    assert total == pytest.approx(1.005) and table[0]["name"] == "softmax"
    assert table[0]["share"] == pytest.approx(0.9 / 1.005, rel=1e-3)


def test_profile_step_on_a_tiny_model(monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(BENCH))
    args = ["model=dit_s", "depth=1", "latent_size=8", "batch_size=2", "device=cpu", "warmup=1"]
    monkeypatch.setattr(sys, "argv", ["profile_step.py", *args, "steps=1", "top=5"])
    threads = torch.get_num_threads()
    try:
        runpy.run_path(str(BENCH / "profile_step.py"), run_name="__main__")
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out.splitlines()
    record = json.loads(out[-1])
    assert record["ranked_by"] == "self_cpu_time" and len(record["top"]) == 5
    ms = [row["ms"] for row in record["top"]]
    assert ms == sorted(ms, reverse=True) and sum(ms) <= record["total_ms"] * 1.001
    for row in record["top"]:
        assert row["share"] == pytest.approx(row["ms"] / record["total_ms"], rel=2e-3)
