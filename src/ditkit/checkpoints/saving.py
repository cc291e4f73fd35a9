"""Crash-safe training checkpoints: Lightning's ModelCheckpoint with atomic writes.

A single-file checkpoint is streamed by `torch.save` into an open temporary file beside its target
and renamed into place when complete (`atomic.atomic_write`): no in-memory copy of the checkpoint,
no staging in the system temp folder, no second rename. A sharded (FSDP2) checkpoint is a folder
written by every rank under one temporary name (rank 0's, broadcast), then swapped in through
`<name>.old` (`atomic.replace_folder`). A kill or a full disk mid-write therefore never leaves a
torn `last.ckpt`: the previous checkpoint stays byte-identical. With async_save the write happens in
the background (`background.py` for files, `sharded_async.py` for folders) and is committed the same
way once complete.
"""

from __future__ import annotations

from pathlib import Path
from weakref import proxy

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy

from .atomic import atomic_write, remove, replace_folder, temporary_name
from .background import BackgroundWriter
from .sharded_async import ShardedAsyncWriter, split_checkpoint, write_metadata


def write_checkpoint_file(checkpoint: dict, filepath: str | Path) -> Path:
    """`torch.save` streamed into an open temporary file beside `filepath`, fsynced, renamed onto
    it: no in-memory copy, no system-temp staging, no second rename (benchmarks/memory.py
    measures it: measure=checkpoint_save)."""
    Path(filepath).parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(filepath) as f:
        torch.save(checkpoint, f)
    return Path(filepath)


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written; the previous one is untouched."""


def _writes_folders(strategy) -> bool:
    """Whether the strategy saves a folder of per-rank shards (FSDP2 with distributed
    checkpoints)."""
    return isinstance(strategy, ModelParallelStrategy) and strategy._save_distributed_checkpoint


class AtomicModelCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint with atomic writes, rank-agreed failures, and a final save.

    - each save is atomic (see the module docstring);
    - a failed save (disk full, permissions) raises `CheckpointSaveError` on every rank together
      instead of leaving the other ranks waiting in a barrier, and retention deletes an older
      checkpoint only after the new one is committed;
    - with `save_last`, training always ends with `last.ckpt` at the final step.

    async_save: the step that saves waits only for one host copy of the checkpoint; the write
    happens in the background. Single-file saves: a background thread streams the copy to disk and
    commits it (`BackgroundWriter`). Sharded (FSDP2 folder) saves: every rank hands its shards to
    `torch.distributed.checkpoint.async_save` under the temporary name, and the folder is moved
    into place at the next save or at the end of training, once every rank's write has finished
    and succeeded (`ShardedAsyncWriter`). The next save, and the end of training, first wait for
    the pending write; a failed background write raises `CheckpointSaveError` there, on every
    rank, and the previous checkpoint stays the resume point. Retention removes an older
    checkpoint only after the newer one is committed.
    """

    def __init__(self, *args, async_save: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.async_save = async_save
        self._writer = BackgroundWriter() if async_save else None
        self._sharded: ShardedAsyncWriter | None = None  # set in setup for FSDP2 folders

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.async_save and _writes_folders(trainer.strategy):
            self._writer = None
            if self._sharded is None:
                self._sharded = ShardedAsyncWriter()
        super().setup(trainer, pl_module, stage)

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        strategy = trainer.strategy
        sharded = _writes_folders(strategy)
        # Every rank writes its shard under rank 0's temporary name.
        tmp = Path(strategy.broadcast(str(temporary_name(filepath)))) if sharded else None
        # A failed background write of the previous checkpoint surfaces here, before any new work
        # (sharded: the completed folders are committed here, on every rank's agreement).
        failed, error = self._wait_for_background(trainer, trainer.global_step)
        try:
            # What Trainer.save_checkpoint does, minus its trailing barrier: a rank that fails here
            # must reach the agreement below rather than leave the others blocked.
            if error is None:
                checkpoint = trainer._checkpoint_connector.dump_checkpoint(self.save_weights_only)
                if self._sharded is not None:
                    state, rest = split_checkpoint(checkpoint)
                    tmp.mkdir(parents=True, exist_ok=True)
                    if trainer.is_global_zero:
                        write_metadata(rest, tmp)
                elif sharded:
                    strategy.save_checkpoint(checkpoint, tmp)
                elif not trainer.is_global_zero:  # DDP replicas / gathered FSDP2 state: rank 0
                    pass
                elif self._writer is not None:
                    self._writer.submit(checkpoint, filepath, trainer.global_step)
                else:
                    write_checkpoint_file(checkpoint, filepath)
        except Exception as e:  # noqa: BLE001 - re-raised below on every rank
            error = e
        if self._sharded is not None:
            # Start the background write on every rank or on none: a rank that failed to prepare
            # must not leave the others' background collectives waiting for it.
            if strategy.reduce_boolean_decision(error is None, all=True):
                try:
                    self._sharded.submit(state, tmp, filepath, trainer.global_step)
                except Exception as e:  # noqa: BLE001
                    error = e
            elif trainer.is_global_zero:
                remove(tmp)
        elif sharded:
            written = strategy.reduce_boolean_decision(error is None, all=True)
            if trainer.is_global_zero:
                try:
                    if written:
                        replace_folder(tmp, filepath)
                    else:
                        remove(tmp)
                except Exception as e:  # noqa: BLE001
                    error = e
        if not strategy.reduce_boolean_decision(error is None, all=True):
            where = (
                f": {type(error).__name__}: {error}" if error is not None else " on another rank"
            )
            raise CheckpointSaveError(
                f"could not write checkpoint {failed or filepath}{where}. The previous checkpoint "
                "is intact; "
                "free disk space or fix the folder's permissions, then rerun the same command to "
                "resume."
            ) from error
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(proxy(self))

    def _wait_for_background(self, trainer: L.Trainer, before_step: int | None = None):
        """(path, error) of a failed background write queued before `before_step` (any, with
        None), (None, None) when none failed. Sharded: commits the completed folders (collective:
        every rank calls it)."""
        if self._sharded is not None:
            return self._sharded.commit(trainer.strategy, before_step)
        if self._writer is None:
            return None, None
        return self._writer.wait(before_step)

    def _remove_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        remove_now = super()._remove_checkpoint
        if self._sharded is not None:
            # At commit time, and only if the newer folder was committed: never the last good one
            # (rank 0, as strategy.remove_checkpoint; the deletion itself in the background).
            sharded = self._sharded
            self._sharded.then(lambda: trainer.is_global_zero and sharded.discard(filepath))
        elif self._writer is not None and trainer.is_global_zero:
            # After the pending write is committed, and only if it was: never the last good one.
            self._writer.then(lambda: remove_now(trainer, filepath))
        else:
            remove_now(trainer, filepath)

    def _finish_background(self, trainer: L.Trainer) -> None:
        """Wait for the background write; raise CheckpointSaveError on every rank if it failed."""
        failed, error = self._wait_for_background(trainer)
        if not trainer.strategy.reduce_boolean_decision(error is None, all=True):
            raise CheckpointSaveError(
                f"could not write checkpoint {failed or 'on another rank'} in the background"
                f"{f': {type(error).__name__}: {error}' if error else ''}. The previous checkpoint "
                "is intact; free disk space or fix the folder's permissions, then rerun the same "
                "command to resume."
            ) from error

    def save_last_now(self, trainer: L.Trainer) -> None:
        """Write last.ckpt at the current step (preemption, end of training) unless already
        there."""
        if self.save_last and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.save_last_now(trainer)
        self._finish_background(trainer)
        if self._sharded is not None:
            self._sharded.close()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        # Let the last complete checkpoint reach the disk before exiting (no collectives here: the
        # other ranks may be gone).
        if self._writer is not None:
            self._writer.wait()
        if self._sharded is not None:
            self._sharded.commit_local(trainer.is_global_zero)
