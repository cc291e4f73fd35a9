"""Golden losses (RELIABILITY row 16): the first 20 training losses of a fixed tiny CPU run of train.py, for
objective=ddpm and objective=flow, equal the numbers committed in tests/fixtures/golden_losses.json.

The run is in float64 (trainer.precision=64-true) so that the numbers do not depend on the CPU's matmul
kernels (AMX, AVX-512 and AVX2 sum in different orders; in float32 that moves the losses by ~1e-6 and the
difference grows with the steps). What is left: the latents are drawn in float32 (2^-24 ~ 6e-8 relative
rounding, and torch's and numpy's SIMD paths for exp / log / cos may differ by one ulp between CPUs), and the
losses are logged as float32 (another 6e-8). rtol=1e-6 is 16x the larger of these; a change to the maths,
the seeds or the order of the draws moves the losses by far more (>1e-3 from the first step).

Regenerate (only with a reason in the commit message): python tests/test_golden_losses.py
"""

import csv
import json
import os
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
FIXTURE = HERE / "fixtures" / "golden_losses.json"
STEPS = 20
OBJECTIVES = ("ddpm", "flow")
RTOL = 1e-6
# Set by `python tests/test_golden_losses.py`: each case then writes its losses into FIXTURE.
REGENERATE = "DITKIT_REGENERATE_GOLDEN_LOSSES"

pytestmark = pytest.mark.slow


@pytest.fixture
def golden_losses(tiny_model, write_synthetic_shards, data_overrides, run_overrides, run_train):
    def golden_losses(tmp: Path, objective: str) -> list[float]:
        """train/loss of steps 0..STEPS-1 of the fixed run."""
        shards = tmp / "shards"
        if not shards.exists():
            write_synthetic_shards(shards)
        args = [
            *tiny_model,
            *data_overrides(shards, batch_size=4, num_workers=0),
            *run_overrides(tmp / "runs", STEPS, every=1000),
            f"objective={objective}",
            f"run_name={objective}",
            "seed=3",
            "trainer.precision=64-true",
        ]
        run_train(*args)
        rows = {}
        with open(tmp / "runs" / objective / "csv" / "version_0" / "metrics.csv") as f:
            for row in csv.DictReader(f):
                if row.get("train/loss"):
                    rows[int(row["step"])] = float(row["train/loss"])
        assert sorted(rows) == list(range(STEPS))
        return [rows[s] for s in range(STEPS)]

    return golden_losses


def write_golden(objective: str, losses: list[float]) -> None:
    """Replace `objective`'s losses in FIXTURE (the file keeps the order of OBJECTIVES)."""
    result = json.loads(FIXTURE.read_text()) if FIXTURE.exists() else {}
    result[objective] = losses
    result = {name: result[name] for name in OBJECTIVES if name in result}
    FIXTURE.write_text(json.dumps(result, indent=1) + "\n")


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_first_20_losses_equal_the_committed_ones(objective, tmp_path, golden_losses):
    if os.environ.get(REGENERATE) == "1":
        write_golden(objective, golden_losses(tmp_path, objective))
        pytest.skip(f"wrote {objective}'s losses to {FIXTURE}")
    expected = json.loads(FIXTURE.read_text())[objective]
    got = golden_losses(tmp_path, objective)
    assert got == pytest.approx(expected, rel=RTOL, abs=0)


if __name__ == "__main__":
    # Through pytest, whose tests/conftest.py provides the fixtures that run train.py.
    os.environ[REGENERATE] = "1"
    sys.exit(pytest.main([__file__, "-q", "-rs", "-p", "no:cacheprovider"]))
