"""benchmarks/data_throughput.py runs end to end in its quick mode and reports consistent numbers."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import data_throughput  # noqa: E402


def test_quick_benchmark_prints_rates_and_ratios(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["data_throughput.py", "quick=true"])
    data_throughput.main()
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(x.get("loader"), x.get("num_workers")) for x in lines] == [
        ("bare", None),
        ("datamodule", 0),
        ("datamodule", 1),
        (None, None),
    ]
    bare = lines[0]["samples_per_sec"]
    assert bare > 0 and all(x["samples_per_sec"] > 0 for x in lines[1:3])
    for x in lines[1:3]:
        assert abs(x["ratio_to_bare"] - x["samples_per_sec"] / bare) < 0.01
    summary = lines[-1]
    assert (
        summary["summary"]
        and summary["latent_shape"] == [4, 32, 32]
        and summary["samples_timed"] == 4 * 8
    )
