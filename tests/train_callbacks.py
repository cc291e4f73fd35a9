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
