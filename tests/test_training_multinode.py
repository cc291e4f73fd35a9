"""Multi-node rehearsal on one machine (issue 14 item 5, first part): two torchrun agents, one per
"node", one process each, meeting through c10d rendezvous on 127.0.0.1, train one DDP run. Each rank
reads its own sample sequence (the resampled stream is a function of (seed, epoch, global rank,
worker)), and the two ranks end with equal weights; only the first node's process takes the run
lock."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
STEPS = 4
pytestmark = pytest.mark.slow


def test_two_nodes_of_one_process_train_one_run(
    tmp_path, write_synthetic_shards, tiny_model, data_overrides, run_overrides
):
    shards = write_synthetic_shards(tmp_path / "shards")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    overrides = [
        *tiny_model,
        *data_overrides(shards),
        *run_overrides(tmp_path, STEPS, STEPS),
        "run_name=nodes",
        "strategy=ddp",
        "trainer.devices=1",
        "trainer.num_nodes=2",
        "+data.return_keys=true",
        "+callbacks.keys._target_=train_callbacks.RecordKeys",
        "objective=flow",
    ]
    env = {
        **os.environ,
        "WANDB_MODE": "offline",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]),
    }
    nodes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes=2",
                "--nproc-per-node=1",
                f"--node-rank={node}",
                "--rdzv-backend=c10d",
                f"--rdzv-endpoint=127.0.0.1:{port}",
                "--rdzv-id=rehearsal",
                str(REPO / "train.py"),
                *overrides,
            ],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for node in (0, 1)
    ]
    for proc in nodes:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, (out[-3000:], err[-5000:])
    run = tmp_path / "nodes"
    keys = [(run / f"keys-rank{r}.txt").read_text().split("\n")[:STEPS] for r in (0, 1)]
    assert all(len(k) == STEPS for k in keys)
    assert all(a != b for a, b in zip(*keys))  # each rank's batches are its own
    ckpt = torch.load(run / "checkpoints/last.ckpt", weights_only=True)
    assert ckpt["global_step"] == STEPS
    weights = [torch.load(run / f"weights-rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert weights[0].keys() == weights[1].keys() == ckpt["state_dict"].keys()
    for key, value in weights[0].items():  # DDP: replicas stay equal, bit for bit
        assert torch.equal(value, weights[1][key]), key
        assert torch.equal(value, ckpt["state_dict"][key]), key
    assert "ema_updates" in weights[0] and weights[0]["ema_updates"].item() == STEPS
