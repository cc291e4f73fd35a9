"""Asynchronous sharded (FSDP2) checkpoints: `torch.distributed.checkpoint.async_save`, committed
at the next save.

The folder holds what Lightning's `ModelParallelStrategy.save_checkpoint` puts there (lightning
2.x, pytorch/strategies/model_parallel.py): DCP shards of {"state_dict", "optimizer_0", ...} with
DCP's `.metadata`, and rank 0's `meta.pt` with the rest of the checkpoint (loops, callbacks, step),
so resume, `checkpoint_step` and `consolidate_checkpoint` read it like a synchronous one.

`async_save` (torch/distributed/checkpoint/state_dict_saver.py) first stages the state dict with
its `DefaultStager(StagingOptions(False, False, False, False))`: a synchronous deep copy of every
tensor into fresh, unpinned CPU storage (`_state_dict_stager.StateDictStager._stage_untyped_storage`
allocates `type(storage)(size, device="cpu")` and `copy_`s, for CPU tensors as well), then runs
the ordinary `save` in a one-thread executor (`_async_thread_executor`). The step waits for that
copy only. The background `save` runs collectives (plan gather, result all-reduce); they must not
interleave with training's collectives on the default group, so each in-flight save uses its own
gloo group (as torchtitan's checkpointer does: `dist.new_group(backend="gloo")`). DCP asserts
that the group has a CPU backend ("A CPU backend must be enabled for async save").

A save goes to the temporary name `<name>.tmp-...` (rank 0's, broadcast); it is moved into place
(as `atomic.replace_folder` does) only at the next save or at the end of training, after every
rank's background write has finished and the ranks agreed that all of them succeeded. Until then the previous
checkpoint is the resume point (auto-resume skips `*.tmp-*`).
"""

from __future__ import annotations

import os
import shutil
import warnings
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from .atomic import OLD_SUFFIX, fsync_path, remove, temporary_name

METADATA = "meta.pt"  # lightning.fabric.utilities.load._METADATA_FILENAME


def split_checkpoint(checkpoint: dict) -> tuple[dict, dict]:
    """Lightning's split of a checkpoint dict (ModelParallelStrategy.save_checkpoint): the DCP part
    {"state_dict", "optimizer_<i>"} and the rest, written by rank 0 to meta.pt."""
    rest = dict(checkpoint)
    state = {"state_dict": rest.pop("state_dict")}
    state.update({f"optimizer_{i}": s for i, s in enumerate(rest.pop("optimizer_states", []))})
    return state, rest


@dataclass
class _Entry:
    step: int  # the optimizer step the checkpoint was taken at
    path: str  # final folder ("" for a retention action)
    tmp: Path | None = None  # where the shards are being written
    future: Future | None = None  # DCP's background save
    action: Callable[[], None] | None = None  # retention: run once the saves before it committed


class ShardedAsyncWriter:
    """The in-flight asynchronous sharded saves of one checkpoint callback, on one rank."""

    def __init__(self) -> None:
        self._pending: list[_Entry] = []
        self._groups: list[dist.ProcessGroup] = []  # one per save that may be in flight at once
        # Removing a replaced or retired folder takes about 1 s per GB here (benchmarks/README.md,
        # Memory); a thread does it, after a rename to a temporary name that nothing reads.
        self._trash = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ditkit-trash")

    def discard(self, path: str | os.PathLike) -> None:
        """Remove a checkpoint folder (or file) in the background: renamed at once to a temporary
        name, which auto-resume skips, then deleted by a thread (rank 0's retention)."""
        path = Path(path)
        if path.is_dir():
            trash = temporary_name(path)
            os.replace(path, trash)
            self._trash.submit(shutil.rmtree, trash, ignore_errors=True)
        elif path.exists():
            path.unlink()

    def _swap_in(self, tmp: Path, final: str) -> None:
        """`atomic.replace_folder`, with the previous version deleted in the background: fsync the
        files, move `final` to `<final>.old` (which auto-resume accepts), the new folder into
        place, then the `.old` one away to `discard`."""
        final = Path(final)
        for f in tmp.rglob("*"):
            if f.is_file():
                fsync_path(f)
        old = final.with_name(final.name + OLD_SUFFIX)
        if old.exists() and final.exists():  # a stale .old; without `final` it is the good copy
            self.discard(old)
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        fsync_path(final.parent)
        if old.exists():
            self.discard(old)

    def _group(self, slot: int) -> dist.ProcessGroup:
        # Every rank makes the same saves in the same order, so the new_group calls match.
        while len(self._groups) <= slot:
            self._groups.append(dist.new_group(backend="gloo"))
        return self._groups[slot]

    def submit(self, state: dict, tmp: Path, filepath: str, step: int) -> None:
        """Copy `state` (the DCP part of a checkpoint taken at optimizer step `step`) to host memory
        now and write its shards into the folder `tmp` in the background; `commit` moves it onto
        `filepath`. Call on every rank, in the same order."""
        # Saves of earlier steps were committed before this one (`commit(before_step=step)`): only
        # this step's (Lightning's top-k folder, then last.ckpt) can still run, each on its group.
        slot = self.in_flight()
        future = dcp.async_save(state, checkpoint_id=tmp, process_group=self._group(slot))
        self._pending.append(_Entry(step, str(filepath), tmp, future))

    def then(self, action: Callable[[], None]) -> None:
        """Run `action` at commit time, after the saves queued so far, if they all committed
        (retention: remove an older checkpoint only once the newer one is in place)."""
        step = self._pending[-1].step if self._pending else -1
        self._pending.append(_Entry(step, "", action=action))

    def commit(
        self, strategy, before_step: int | None = None
    ) -> tuple[str | None, BaseException | None]:
        """Wait for the saves queued before optimizer step `before_step` (all, with None), agree
        across ranks which succeeded everywhere, and (rank 0) move those into place and remove the
        others' temporary folders. Returns (path, error) of the first failure, or (None, None).
        Collective: call on every rank."""
        done = [e for e in self._pending if before_step is None or e.step < before_step]
        self._pending = [e for e in self._pending if e not in done]
        failure: tuple[str | None, BaseException | None] = (None, None)
        all_committed = True
        for entry in done:
            if entry.future is None:
                if all_committed and entry.action is not None:
                    try:  # an older checkpoint left behind is no reason to stop the run
                        entry.action()
                    except OSError as e:
                        warnings.warn(f"could not remove an older checkpoint: {e}", stacklevel=2)
                continue
            error = entry.future.exception()
            ok = strategy.reduce_boolean_decision(error is None, all=True)
            if ok and strategy.is_global_zero:
                try:
                    self._swap_in(entry.tmp, entry.path)
                except Exception as e:  # noqa: BLE001 - agreed on by the caller
                    ok, error = False, e
            elif not ok and strategy.is_global_zero:
                remove(entry.tmp)
            if not ok:
                all_committed = False
                if failure[1] is None:
                    failure = (entry.path, error)
        return failure

    def commit_local(self, is_global_zero: bool) -> None:
        """After an exception (no collectives): wait for this rank's saves (a write whose peer rank
        died fails at the process group's timeout), and rank 0 moves the successful ones into
        place. A DCP save succeeds on a rank only once every rank's shards and
        the coordinator's .metadata are written (the "write" all-reduce of `_save_state_dict`), so
        a successful future on rank 0 means the folder is complete."""
        done, self._pending = self._pending, []
        for entry in done:
            if entry.future is None:
                continue
            ok = entry.future.exception() is None
            if is_global_zero:
                try:
                    self._swap_in(entry.tmp, entry.path) if ok else remove(entry.tmp)
                except OSError as e:  # do not hide the exception that stopped the run
                    warnings.warn(f"could not commit checkpoint {entry.path}: {e}", stacklevel=2)

    def close(self) -> None:
        """Wait for the background deletions (end of training)."""
        self._trash.shutdown(wait=True)
        self._trash = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ditkit-trash")

    def in_flight(self) -> int:
        """How many saves wait for their commit."""
        return sum(e.future is not None for e in self._pending)


def write_metadata(rest: dict, tmp: Path) -> None:
    """rank 0's meta.pt: the checkpoint minus its DCP part (small: loops, callbacks, step)."""
    torch.save(rest, tmp / METADATA)
