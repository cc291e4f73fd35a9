"""Atomic writes: the one helper every writer uses (checkpoints, FID references, samples.npz, the
evaluation part store, manifests, shards).

A file is written under a temporary name beside its target, `<name>.tmp-<host>-<pid>-<random>`,
flushed and fsynced, then renamed onto the target (`os.replace` is atomic on POSIX file systems, NFS
and Lustre included), and the folder is fsynced so the rename itself survives a power cut. Readers
therefore see the old file or the new one, never half of one; a crash leaves only a `*.tmp-*` file,
which nothing reads. The temporary name is unique per writer (host, process, random suffix), so two
processes writing the same target never move each other's half-written files.

This module imports nothing from ditkit: data, evaluation and training all use it.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

TMP_MARK = (
    ".tmp-"  # every temporary name contains it; auto-resume and shard readers skip such names
)
OLD_SUFFIX = (
    ".old"  # a folder being replaced is moved here first (folders cannot be replaced in one step)
)


def temporary_name(path: str | os.PathLike) -> Path:
    """A name beside `path` that no other writer uses: `<name>.tmp-<host>-<pid>-<6 hex digits>`."""
    path = Path(path)
    host = socket.gethostname().split(".")[0] or "host"
    return path.with_name(f"{path.name}{TMP_MARK}{host}-{os.getpid()}-{secrets.token_hex(3)}")


def fsync_path(path: str | os.PathLike) -> None:
    """fsync a file or a folder by path (a folder's fsync makes the renames inside it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class AtomicFile:
    """A file being written under a temporary name; `commit()` moves it onto `path`, `abort()` drops
    it.

    For writers that keep the file open across many calls (a shard filled batch by batch);
    everything else uses the `atomic_write` context manager."""

    def __init__(self, path: str | os.PathLike, mode: str = "wb") -> None:
        if "w" not in mode:
            raise ValueError(f"AtomicFile writes a new file: mode must contain 'w', got {mode!r}")
        self.path = Path(path)
        self.tmp = temporary_name(self.path)
        self.file: IO[Any] = open(self.tmp, mode)

    def commit(self) -> Path:
        """Flush, fsync, close and rename onto `path` (then fsync its folder). Returns `path`.
        If any of it fails (a full disk, a kill of the rename), the temporary file is removed and
        `path` keeps its old content."""
        try:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            os.replace(self.tmp, self.path)
        except BaseException:
            self.abort()
            raise
        fsync_path(self.path.parent)
        return self.path

    def abort(self) -> None:
        """Close and remove the temporary file; the target is untouched."""
        with contextlib.suppress(OSError):
            self.file.close()
        with contextlib.suppress(FileNotFoundError):
            self.tmp.unlink()


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO[Any]]:
    """Write `path` atomically: yields an open file at a unique temporary name; on a normal exit it
    is committed onto `path`, on an exception it is removed and `path` keeps its old content.

        with atomic_write(run / "metrics.json", "w") as f:
            json.dump(result, f)
    """
    target = AtomicFile(path, mode)
    try:
        yield target.file
    except BaseException:
        target.abort()
        raise
    target.commit()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """For libraries that write by path (safetensors, torch.distributed.checkpoint): yields a unique
    temporary path beside `path`; whatever was written there (a file or a folder) is committed onto
    `path` on a normal exit and removed on an exception."""
    tmp = temporary_name(path)
    try:
        yield tmp
        commit(tmp, path)
    except BaseException:
        remove(tmp)
        raise


def commit(tmp: str | os.PathLike, final: str | os.PathLike) -> Path:
    """Move a completely written file or folder `tmp` onto `final`, durably. Returns `final`."""
    tmp, final = Path(tmp), Path(final)
    if tmp.is_dir():
        return replace_folder(tmp, final)
    fsync_path(tmp)
    os.replace(tmp, final)
    fsync_path(final.parent)
    return final


def replace_folder(tmp: str | os.PathLike, final: str | os.PathLike) -> Path:
    """Move a completely written folder `tmp` onto `final` (a sharded checkpoint, a built data set).

    Every file in it is fsynced first. An existing `final` is moved to `<final>.old`, the new folder
    renamed into place, then `.old` removed: between the two renames the previous version is still
    complete under `.old`, which auto-resume accepts."""
    tmp, final = Path(tmp), Path(final)
    for f in tmp.rglob("*"):
        if f.is_file():
            fsync_path(f)
    old = final.with_name(final.name + OLD_SUFFIX)
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_path(final.parent)
    shutil.rmtree(old, ignore_errors=True)
    return final


def remove(path: str | os.PathLike) -> None:
    """Remove a partial file or folder, if any."""
    path = Path(path)
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
