"""Elastic restart (issue 14 item 6): under `torchrun --max-restarts=1`, one worker of a 2-process
DDP run is SIGKILLed mid-training; torchrun restarts the group, which resumes from the last
checkpoint (resume=auto) and reaches max_steps with the weights, EMA and AdamW moments of an
uninterrupted run, bit for bit: every draw is a function of (seed, step, rank)."""

import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
STEPS = 8
pytestmark = pytest.mark.slow


def torchrun(*overrides: str, restarts: int = 0) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        f"--max-restarts={restarts}",
        str(REPO / "train.py"),
        *overrides,
    ]


def test_a_killed_worker_is_restarted_and_the_run_ends_as_if_uninterrupted(
    tmp_path, write_synthetic_shards, tiny_model, data_overrides, run_overrides, run_train
):
    shards = write_synthetic_shards(tmp_path / "shards")

    def args(name):
        return [
            *tiny_model,
            *data_overrides(shards),
            *run_overrides(tmp_path, STEPS, 2),
            f"run_name={name}",
            "strategy=ddp",
            "trainer.devices=2",
            "objective=flow",
            "optimizer.lr=1e-3",
            "module.ema_decay=0.5",
        ]

    run_train(cmd=torchrun(*args("straight")), timeout=400)
    kill = [
        "+callbacks.kill._target_=train_callbacks.KillOnFirstAttempt",
        "+callbacks.kill.rank=1",
        "+callbacks.kill.step=5",
    ]
    proc = run_train(cmd=torchrun(*args("killed"), *kill, restarts=1), timeout=600)
    log = proc.stdout + proc.stderr
    assert "Signals.SIGKILL" in log or "exitcode: -9" in log  # the kill happened ...
    assert "ditkit: resuming from" in log  # ... and the restarted group resumed
    a = torch.load(tmp_path / "straight/checkpoints/last.ckpt", weights_only=True)
    b = torch.load(tmp_path / "killed/checkpoints/last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] == STEPS
    assert any(k.startswith("ema.") for k in a["state_dict"])
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    sa, sb = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    for i in sa:
        for moment in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(sa[i][moment], sb[i][moment]), (i, moment)
