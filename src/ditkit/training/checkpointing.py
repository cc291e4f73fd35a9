"""Crash-safe checkpoints and auto-resume.

Every checkpoint is written to `<name>.tmp` next to its final path and renamed into place only when
complete (os.replace is atomic on POSIX), so a kill or a full disk mid-write never leaves a torn
`last.ckpt`: the previous file stays byte-identical. Sharded (FSDP2) checkpoints are folders; those
are swapped through `<name>.old`, which auto-resume also accepts. Auto-resume takes the newest
checkpoint that passes `checkpoint_step`, skipping `.tmp` leftovers and truncated or corrupt files with
a warning that names them.
"""

import os
import shutil
import warnings
import zipfile
from pathlib import Path
from weakref import proxy

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

TMP_SUFFIX = ".tmp"
OLD_SUFFIX = ".old"
_METADATA = "meta.pt"  # the non-tensor part of a Lightning sharded checkpoint folder


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written; the previous one is untouched."""


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit(tmp: str | Path, final: str | Path) -> None:
    """Move a completely written checkpoint (file or sharded folder) `tmp` onto `final`."""
    tmp, final = Path(tmp), Path(final)
    if tmp.is_dir():
        for f in tmp.iterdir():
            _fsync(f)
        old = final.with_name(final.name + OLD_SUFFIX)
        if old.exists():
            shutil.rmtree(old)
        if final.exists():
            os.replace(final, old)  # folders cannot be replaced in one step; `.old` bridges the gap
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        _fsync(tmp)
        os.replace(tmp, final)
    _fsync(final.parent)


def discard(path: str | Path) -> None:
    """Remove a partial checkpoint (file or folder), if any."""
    path = Path(path)
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        path.unlink()


class AtomicModelCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint with atomic writes, rank-agreed failures, and a final save.

    - each save goes to `<path>.tmp` and is renamed into place (see `commit`);
    - a failed save (disk full, permissions) raises `CheckpointSaveError` on every rank together
      instead of leaving the other ranks waiting in a barrier, and retention deletes an older
      checkpoint only after the new one is committed;
    - with `save_last`, training always ends with `last.ckpt` at the final step.
    """

    def _save_checkpoint(self, trainer: "L.Trainer", filepath: str) -> None:
        tmp = filepath + TMP_SUFFIX
        error = None
        try:
            # What Trainer.save_checkpoint does, minus its trailing barrier: a rank that fails here must
            # reach the agreement below rather than leave the others blocked.
            checkpoint = trainer._checkpoint_connector.dump_checkpoint(self.save_weights_only)
            trainer.strategy.save_checkpoint(checkpoint, tmp)
        except Exception as e:  # noqa: BLE001 - re-raised below on every rank
            error = e
        if (
            trainer.strategy.reduce_boolean_decision(error is None, all=True)
            and trainer.is_global_zero
        ):
            try:
                commit(tmp, filepath)
            except Exception as e:  # noqa: BLE001
                error = e
        if not trainer.strategy.reduce_boolean_decision(error is None, all=True):
            if trainer.is_global_zero:
                discard(tmp)
            where = (
                f": {type(error).__name__}: {error}" if error is not None else " on another rank"
            )
            raise CheckpointSaveError(
                f"could not write checkpoint {filepath}{where}. The previous checkpoint is intact; free disk "
                f"space or fix the folder's permissions, then rerun the same command to resume."
            ) from error
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(proxy(self))

    def save_last_now(self, trainer: "L.Trainer") -> None:
        """Write last.ckpt at the current step (preemption, end of training) unless already there."""
        if self.save_last and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_end(self, trainer: "L.Trainer", pl_module: "L.LightningModule") -> None:
        self.save_last_now(trainer)


def checkpoint_step(path: str | Path) -> int:
    """Check a checkpoint and return its global step.

    A file is read once end to end to verify the CRC-32 of every record of its zip container (torch.load
    itself checks none, so a flipped bit would load silently), then opened memory-mapped with
    weights_only. A sharded folder must hold DCP's .metadata and a readable meta.pt.
    Raises ValueError naming the file when it is truncated, corrupt, or not a training checkpoint."""
    path = Path(path)
    try:
        if path.is_dir():
            meta = path / _METADATA
            if not (path / ".metadata").is_file() or not meta.is_file():
                raise ValueError("sharded checkpoint folder without .metadata / meta.pt")
            ckpt = torch.load(meta, map_location="cpu", weights_only=True)
        else:
            with zipfile.ZipFile(path) as archive:
                bad = archive.testzip()
            if bad is not None:
                raise ValueError(f"record {bad} fails its CRC-32 check")
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - any failure to open means: not usable
        raise ValueError(
            f"checkpoint {path} cannot be read ({type(e).__name__}: {e}); it is truncated or corrupt"
        ) from e
    if not isinstance(ckpt, dict) or "global_step" not in ckpt:
        raise ValueError(f"{path} is not a ditkit training checkpoint (no global_step)")
    return int(ckpt["global_step"])


def find_resume_checkpoint(folder: str | Path) -> Path | None:
    """The newest usable checkpoint in `folder` (a run's checkpoints/), or None when there is none.

    Candidates are `*.ckpt` files/folders and `*.ckpt.old` folders, newest modification time first;
    `*.tmp` leftovers of interrupted saves are never considered, and unreadable files are skipped with
    a warning that names them."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    candidates = [
        p
        for p in folder.iterdir()
        if p.name.endswith(".ckpt") or p.name.endswith(".ckpt" + OLD_SUFFIX)
    ]
    for path in sorted(candidates, key=lambda p: p.stat().st_mtime, reverse=True):
        try:
            checkpoint_step(path)
        except ValueError as e:
            warnings.warn(f"auto-resume skips {e}", stacklevel=2)
            continue
        return path
    return None
