"""benchmarks/memory.py on a tiny DiT: the bytes it reports for FSDP2 are exact, and per-block
checkpointing keeps about the block inputs alone (no timing or machine-specific number asserted)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ditkit.models import build_dit

ROOT = Path(__file__).parents[1]
DEPTH, LATENT, BATCH = 4, 16, 4


@pytest.fixture(scope="module")
def records():
    args = [
        "model=dit_s",
        f"depth={DEPTH}",
        f"latent_size={LATENT}",
        f"batch_size={BATCH}",
        "world_size=2",
        "measure=activations,training_state",  # checkpoint_save: test_benchmark_checkpoint_save.py
    ]
    out = subprocess.run(
        [sys.executable, "benchmarks/memory.py", *args],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return {
        r["measure"]: r
        for r in map(json.loads, (line for line in out.splitlines() if line.startswith("{")))
    }


def test_fsdp2_halves_the_training_state_exactly(records):
    state = records["training_state"]
    params = sum(p.numel() for p in build_dit("S", 2, input_size=LATENT, depth=DEPTH).parameters())
    fp32 = 4 * params
    assert state["unsharded"] == {
        "weights": fp32,
        "grads": fp32,
        "adam_moments": 2 * fp32,
        "ema": fp32,
    }
    for kind, full in state["unsharded"].items():
        assert (
            sum(rank[kind] for rank in state["ranks"]) == full
        )  # the shards partition every tensor
    per_rank = [sum(rank.values()) for rank in state["ranks"]]
    assert max(per_rank) <= 5 * fp32 / 2 * 1.01  # 20 bytes per parameter, split over 2 ranks


def test_checkpointing_keeps_little_more_than_the_block_inputs(records):
    act = records["activations"]
    tokens, hidden = (LATENT // 2) ** 2, 384
    block_inputs_mb = (
        DEPTH * BATCH * tokens * hidden * 4 / 2**20
    )  # each block's fp32 input x: (N, T, D)
    assert block_inputs_mb <= act["checkpointed_mb"] < 3 * block_inputs_mb
    assert act["plain_mb"] > 10 * act["checkpointed_mb"]
    assert act["saved_mb"] == pytest.approx(act["plain_mb"] - act["checkpointed_mb"], abs=0.11)
