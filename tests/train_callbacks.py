"""Test-only Lightning callbacks that train.py subprocesses build from a Hydra `_target_`.

Imported only by those child processes, never by a test module: run_train (tests/conftest.py) puts
tests/ on the child's PYTHONPATH, so that e.g. `+callbacks.nan._target_=train_callbacks.NaNGradOnRank`
(tests/test_training_parallel.py) resolves in train.py. Everything else the tests share is a fixture
in tests/conftest.py.
"""

import lightning as L

from ditkit.training.ema import local


class NaNGradOnRank(L.Callback):
    """Writes a NaN into one local gradient of one rank at one step, after DDP's all-reduce: only that
    rank sees the NaN, so the ranks stay in step only if they agree on skipping."""

    def __init__(self, rank: int = 1, step: int = 2):
        self.rank, self.step = rank, step

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_rank == self.rank and trainer.global_step == self.step:
            grad = next(p.grad for p in pl_module.model.parameters() if p.grad is not None)
            local(grad).view(-1)[0] = float("nan")


class KillOnFirstAttempt(L.Callback):
    """SIGKILLs this process (one rank of a torchrun group) at one step, on torchrun's first attempt
    only (TORCHELASTIC_RESTART_COUNT=0): the restarted group trains on undisturbed."""

    def __init__(self, rank: int = 1, step: int = 5):
        self.rank, self.step = rank, step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        import os
        import signal

        first = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
        if first and trainer.global_rank == self.rank and trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class RecordKeys(L.Callback):
    """Appends the sample keys of each training batch (data.return_keys=true) to
    <default_root_dir>/keys-rank<global rank>.txt, one batch per line; at the end, saves this rank's
    weights to weights-rank<global rank>.pt."""

    def on_train_end(self, trainer, pl_module):
        from pathlib import Path

        import torch

        path = Path(trainer.default_root_dir) / f"weights-rank{trainer.global_rank}.pt"
        torch.save({k: v.detach().clone() for k, v in pl_module.state_dict().items()}, path)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        from pathlib import Path

        path = Path(trainer.default_root_dir) / f"keys-rank{trainer.global_rank}.txt"
        with open(path, "a") as f:
            f.write(" ".join(batch["key"]) + "\n")
