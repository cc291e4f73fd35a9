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


class FailShardedWrite(L.Callback):
    """On one rank, makes DCP's background write of the checkpoint folders named `name` fail with a
    full disk (tests/test_checkpoints_async_fsdp.py). Before failing, it records the SHA-256 of
    every file of the committed checkpoints beside it in <checkpoint dir>/../hashes.json: what must
    still be there, byte for byte, after the run stops."""

    def __init__(self, rank: int = 1, name: str = "step=4.ckpt"):
        self.rank, self.name = rank, name

    def setup(self, trainer, pl_module, stage):
        if trainer.global_rank != self.rank:
            return
        from torch.distributed.checkpoint import FileSystemWriter

        write_data, name = FileSystemWriter.write_data, self.name

        def failing_write_data(writer, plan, planner):
            import errno
            import hashlib
            import json
            from pathlib import Path

            folder = Path(str(writer.path))
            if not folder.name.startswith(name + ".tmp-"):
                return write_data(writer, plan, planner)
            hashes = {
                str(f.relative_to(folder.parent)): hashlib.sha256(f.read_bytes()).hexdigest()
                for ckpt in folder.parent.glob("*.ckpt")
                for f in sorted(ckpt.rglob("*"))
                if f.is_file()
            }
            (folder.parent.parent / "hashes.json").write_text(json.dumps(hashes))
            raise OSError(errno.ENOSPC, "No space left on device (injected)")

        FileSystemWriter.write_data = failing_write_data


class KillAfterShardedSave(L.Callback):
    """At one step, waits until this rank's asynchronous sharded saves are written (not yet
    committed: that happens at the next save), then SIGKILLs every rank: the kill between the copy
    and the commit."""

    def __init__(self, step: int = 7):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        import os
        import signal

        import torch.distributed as dist

        if trainer.global_step != self.step:
            return
        for callback in trainer.checkpoint_callbacks:
            for entry in getattr(callback._sharded, "_pending", []):
                if entry.future is not None:
                    entry.future.result()
        dist.barrier()
        os.kill(os.getpid(), signal.SIGKILL)
