"""Exact resume across processes (RELIABILITY rows 4-6): N steps + resume in a new process + N steps
equals 2N steps straight, bit for bit, with 2 loader workers and with none, an epoch boundary in
between; a SIGKILLed run rerun with the same command, and a SIGTERMed (preempted) one, end on the same
weights too."""

import csv
import os
import signal
import subprocess
import time
from pathlib import Path

import lightning as L
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
N = 10  # 64 samples / batch 4 = 16 batches per epoch: step N is mid-epoch, 2N crosses an epoch end
ENV = {"OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def shards(tmp_path_factory, write_synthetic_shards):
    return write_synthetic_shards(tmp_path_factory.mktemp("shards"))


@pytest.fixture(scope="module")
def overrides(tiny_model, data_overrides, run_overrides):
    def overrides(
        out: Path, shards: Path, name: str, steps: int, every: int = N, workers: int = 2
    ) -> list[str]:
        return [
            *tiny_model,
            *data_overrides(shards, num_workers=workers),
            *run_overrides(out, steps, every),
            f"run_name={name}",
            "objective=ddpm",
            "seed=3",
        ]

    return overrides


@pytest.fixture(scope="module")
def straight(tmp_path_factory, shards, overrides, run_train):
    out = tmp_path_factory.mktemp("runs")
    run_train(*overrides(out, shards, "straight", 2 * N))
    return out / "straight"


def losses(run: Path) -> dict[int, str]:
    """step -> train/loss as written by the CSV logger, over every (re)start of the run."""
    result = {}
    for path in sorted((run / "csv").glob("version_*/metrics.csv")):
        with open(path) as f:
            for row in csv.DictReader(f):
                if row.get("train/loss"):
                    result[int(row["step"])] = row["train/loss"]
    return result


def assert_same_state(a: Path, b: Path) -> None:
    """Weights, EMA, counters and AdamW moments of two last.ckpt files are equal, bit for bit."""
    ca = torch.load(a / "checkpoints" / "last.ckpt", weights_only=True)
    cb = torch.load(b / "checkpoints" / "last.ckpt", weights_only=True)
    assert ca["global_step"] == cb["global_step"] == 2 * N
    assert ca["state_dict"].keys() == cb["state_dict"].keys()
    assert any(k.startswith("ema.") for k in ca["state_dict"])
    for key, value in ca["state_dict"].items():
        assert torch.equal(value, cb["state_dict"][key]), key
    sa, sb = ca["optimizer_states"][0]["state"], cb["optimizer_states"][0]["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        for moment in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(sa[i][moment], sb[i][moment]), (i, moment)


def test_resume_in_a_new_process_is_exact(straight, shards, overrides, run_train):
    out = straight.parent
    run_train(*overrides(out, shards, "resumed", N))
    assert torch.load(out / "resumed/checkpoints/last.ckpt", weights_only=True)["global_step"] == N
    run_train(*overrides(out, shards, "resumed", 2 * N))  # same folder: resume=auto continues it

    full, resumed = losses(straight), losses(out / "resumed")
    assert sorted(full) == sorted(resumed) == list(range(2 * N))
    assert [resumed[s] for s in range(N, 2 * N)] == [full[s] for s in range(N, 2 * N)]
    assert len(list((out / "resumed/csv").glob("version_*/metrics.csv"))) == 2  # two processes
    assert_same_state(straight, out / "resumed")


def test_resume_without_loader_workers_is_exact(tmp_path, shards, overrides, run_train):
    """The same with the data read in the training process (num_workers=0, RELIABILITY row 4)."""
    run_train(*overrides(tmp_path, shards, "straight", 2 * N, workers=0))
    run_train(*overrides(tmp_path, shards, "resumed", N, workers=0))
    run_train(*overrides(tmp_path, shards, "resumed", 2 * N, workers=0))
    full, resumed = losses(tmp_path / "straight"), losses(tmp_path / "resumed")
    assert sorted(full) == sorted(resumed) == list(range(2 * N))
    assert [resumed[s] for s in range(N, 2 * N)] == [full[s] for s in range(N, 2 * N)]
    assert_same_state(tmp_path / "straight", tmp_path / "resumed")


def wait_for_checkpoint(proc: subprocess.Popen, path: Path, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, (
            f"train.py ended before writing {path}:\n{proc.communicate()[1][-3000:]}"
        )
        assert time.time() < deadline, f"no {path} after {timeout} s"
        time.sleep(0.01)


@pytest.fixture
def start(train_cmd):
    def start(args: list[str]) -> subprocess.Popen:
        env = {**os.environ, "WANDB_MODE": "offline", "PYTHONWARNINGS": "ignore", **ENV}
        return subprocess.Popen(
            train_cmd(*args),
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    return start


def test_sigkill_then_the_same_command_resumes_to_the_same_weights(
    straight, shards, overrides, run_train, start
):
    args = overrides(straight.parent, shards, "killed", 2 * N, every=2)
    proc = start(args)
    wait_for_checkpoint(proc, straight.parent / "killed/checkpoints/last.ckpt")
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    committed = torch.load(straight.parent / "killed/checkpoints/last.ckpt", weights_only=True)[
        "global_step"
    ]
    assert 2 <= committed < 2 * N
    run_train(*args)  # the very same command
    restarts = sorted((straight.parent / "killed/csv").glob("version_*/metrics.csv"))
    assert len(restarts) == 2
    with open(restarts[1]) as f:
        first_step = min(int(r["step"]) for r in csv.DictReader(f) if r.get("train/loss"))
    assert first_step >= committed  # continued from a committed step, not from scratch
    assert_same_state(straight, straight.parent / "killed")


def test_sigterm_saves_exits_cleanly_and_the_rerun_matches(
    straight, shards, overrides, run_train, start
):
    args = overrides(straight.parent, shards, "preempted", 2 * N, every=1000)
    proc = start(
        [*args, "callbacks.archive.every_n_train_steps=2"]
    )  # a marker that training is under way
    ckpts = straight.parent / "preempted/checkpoints"
    wait_for_checkpoint(proc, ckpts / "step=0000002.ckpt")
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-3000:]
    saved = torch.load(ckpts / "last.ckpt", weights_only=True)["global_step"]
    assert (
        2 <= saved < 2 * N
    )  # written by the preemption handler (the regular cadence is 1000 steps)
    assert f"received SIGTERM; saving last.ckpt at step {saved}" in stdout + stderr
    run_train(*args, "callbacks.archive.every_n_train_steps=2")
    assert_same_state(straight, straight.parent / "preempted")


def test_sigusr1_in_process_saves_at_the_step_boundary_and_stops(tmp_path, tiny_dit, tiny_batches):
    from torch.utils.data import DataLoader

    from ditkit.checkpoints import AtomicModelCheckpoint
    from ditkit.objectives import RectifiedFlow
    from ditkit.training import DiffusionModule, Preemption

    class SignalAt(L.Callback):
        def on_train_batch_start(self, trainer, *args):
            if trainer.global_step == 3:
                signal.raise_signal(signal.SIGUSR1)  # arrives mid-step, before the forward

    model, data = tiny_dit(), tiny_batches(64)
    saver = AtomicModelCheckpoint(
        dirpath=tmp_path, every_n_train_steps=1000, save_top_k=0, save_last=True
    )
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=50,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[SignalAt(), Preemption(), saver],
    )
    previous = signal.getsignal(signal.SIGUSR1)
    trainer.fit(DiffusionModule(model, RectifiedFlow()), DataLoader(data, batch_size=4))
    assert trainer.global_step == 4  # the step in flight finished, then training stopped
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["global_step"] == 4
    assert signal.getsignal(signal.SIGUSR1) == previous  # handlers restored after training
