"""Preemption: SIGTERM / SIGUSR1 -> checkpoint at the next step boundary -> clean exit (-> SLURM
requeue).

A signal only sets a flag (a handler that saved a checkpoint itself could fire mid-step, or on one
rank while the others sit in a collective). After each training batch the ranks agree on the flag
with one all-reduce, save `last.ckpt` through the atomic checkpoint callback, and stop; rerunning
the same command resumes from it (resume=auto). On SLURM, rank 0 also requeues the job. This
replaces Lightning's own SIGUSR1 handler on SLURM (which saves inside the signal handler) for the
duration of training. Ask SLURM for the warning signal ahead of the time limit: `#SBATCH
--signal=USR1@120`.
"""

import os
import re
import signal
import subprocess

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from ditkit.checkpoints.saving import AtomicModelCheckpoint


class Preemption(Callback):
    """signals: names of the signals that mean "save and stop" (default SIGTERM, SIGUSR1).
    requeue: on SLURM, `scontrol requeue` the job after saving."""

    def __init__(self, signals: tuple[str, ...] = ("SIGTERM", "SIGUSR1"), requeue: bool = True):
        self.signals = [
            signal.Signals[s] if isinstance(s, str) else signal.Signals(s) for s in signals
        ]
        self.requeue = requeue
        self.received: int | None = None
        self._previous: dict[signal.Signals, object] = {}

    def _handler(self, signum, frame) -> None:
        self.received = signum

    def on_train_start(self, trainer: "L.Trainer", pl_module: "L.LightningModule") -> None:
        for s in self.signals:
            self._previous[s] = signal.signal(s, self._handler)

    def on_train_end(self, trainer: "L.Trainer", pl_module: "L.LightningModule") -> None:
        self._restore()

    def teardown(self, trainer: "L.Trainer", pl_module: "L.LightningModule", stage: str) -> None:
        self._restore()

    def _restore(self) -> None:
        for s, previous in self._previous.items():
            signal.signal(s, previous)
        self._previous = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        flag = torch.tensor(0.0 if self.received is None else 1.0, device=pl_module.device)
        if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
            dist.all_reduce(
                flag, op=dist.ReduceOp.MAX
            )  # one rank signalled = all ranks stop, together
        if flag.item() == 0:
            return
        name = (
            signal.Signals(self.received).name
            if self.received is not None
            else "a signal on another rank"
        )
        rank_zero_info(
            f"ditkit: received {name}; saving last.ckpt at step {trainer.global_step} and stopping"
        )
        savers = [
            c
            for c in trainer.checkpoint_callbacks
            if isinstance(c, AtomicModelCheckpoint) and c.save_last
        ]
        if not savers:
            rank_zero_warn(
                "ditkit: preempted, but no checkpoint callback with save_last is configured: nothing saved"
            )
        for saver in savers:
            saver.save_last_now(trainer)
        trainer.should_stop = True
        if self.requeue and trainer.is_global_zero and "SLURM_JOB_ID" in os.environ:
            _slurm_requeue()


def _slurm_requeue() -> None:
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    job = (
        f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}"
        if array_job
        else os.environ["SLURM_JOB_ID"]
    )
    if not re.fullmatch(r"[0-9_]+", job):
        rank_zero_warn(f"ditkit: not requeueing: unexpected SLURM job id {job!r}")
        return
    result = subprocess.run(["scontrol", "requeue", job], check=False)
    if result.returncode == 0:
        rank_zero_info(f"ditkit: requeued SLURM job {job}")
    else:
        rank_zero_warn(
            f"ditkit: `scontrol requeue {job}` failed with exit code {result.returncode}"
        )
