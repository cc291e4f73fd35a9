"""benchmarks/memory.py measure=checkpoint_save (issue 14 item 2): ditkit's save streams into the
run folder (no extra host memory to speak of, nothing in the system temp folder), where Lightning's
stock `_atomic_save` holds the whole checkpoint in memory and stages it in the temp folder."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
SAVE_MB = 32  # large against the few MB of torch.save's own buffers and of allocator noise


@pytest.mark.slow  # two fresh processes
def test_the_save_takes_no_copy_and_writes_nothing_outside_the_run_folder(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "benchmarks/memory.py",
            "measure=checkpoint_save",
            f"save_mb={SAVE_MB}",
            f"save_dir={tmp_path}",
        ],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    rows = {
        r["variant"]: r for r in map(json.loads, (x for x in out.splitlines() if x.startswith("{")))
    }
    ours, stock = rows["ditkit"], rows["lightning"]
    # 8 tensors of 4 MB plus the zip container's headers: a few kB over SAVE_MB.
    assert SAVE_MB <= ours["checkpoint_mb"] <= SAVE_MB + 0.1
    assert ours["extra_fraction"] < 0.10  # the acceptance bound: below 10% of the checkpoint
    assert ours["outside_run_folder_mb"] == 0.0 and ours["left_in_folder"] == []
    # The stock path, for contrast: a BytesIO copy of the whole file, staged in the temp folder.
    assert stock["extra_fraction"] > 0.9
    assert stock["outside_run_folder_mb"] >= 0.9 * SAVE_MB
