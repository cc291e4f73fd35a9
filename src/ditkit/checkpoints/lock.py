"""One run per folder: an exclusive lock on `<run>/run.lock`, held for the life of the run.

The lock is `fcntl.flock(LOCK_EX | LOCK_NB)` on an open file, so the kernel (or the file server)
drops it when the holding process dies however it dies: SIGKILL, OOM kill, a node that loses power.
A rerun or a SLURM requeue is therefore never blocked by a stale lock, and there is no "remove the
lock file" step. The file stays in the folder between runs; only the lock on it matters. The holder
writes its host, pid and start time into the file so that a refused second process can name it.

File systems:
- local disks: flock is exact.
- NFS: Linux NFS clients implement flock with POSIX byte-range locks sent to the server (NLM for
  NFSv3, the protocol's own lock state for NFSv4), so a lock taken on one node is seen on every
  node. A holder whose node dies keeps the lock until the server reclaims it: when its NFSv4 lease
  expires (90 s by default) or, on v3, when statd reports the node's reboot. A requeue within that
  window is refused with the dead holder's name; wait for the lease and rerun.
- Lustre: flock is cluster-wide only with the `flock` mount option. With `localflock` it is coherent
  on one node only (two jobs on two nodes are not told apart). With neither (`noflock`, the
  default), flock fails with ENOSYS: ditkit then warns that the folder is unprotected and trains on
  (refusing would make such file systems unusable); mount with `-o flock` to get the check.

Forked children (DataLoader workers) inherit the open file and with it the lock; an after-fork hook
closes their copy, so that the lock goes with the training process and not with a worker that
outlives it by a few seconds.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

LOCK_NAME = "run.lock"
# flock errors that mean "this file system does not do locks", not "someone holds it".
_UNSUPPORTED = {errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK, errno.EINVAL}
_HELD: set[int] = set()  # file descriptors of the locks this process holds
_HELD_DIRS: dict[Path, RunLock] = {}  # the same locks by run folder (resolved)


def _close_in_child() -> None:
    for fd in list(_HELD):
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD.clear()
    _HELD_DIRS.clear()


os.register_at_fork(after_in_child=_close_in_child)


class RunLockedError(RuntimeError):
    """Another live process holds the run folder's lock."""


def read_holder(path: str | os.PathLike) -> dict:
    """The holder's record in a lock file ({} when unreadable)."""
    try:
        return json.loads(Path(path).read_text() or "{}")
    except (OSError, ValueError):
        return {}


class RunLock:
    """An exclusive lock on `<run_dir>/run.lock`; `acquire()` raises `RunLockedError` naming the
    holder when another process has it. Use as a context manager or call acquire/release."""

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.fd: int | None = None
        # Whether this lock made the folder (None: unknown): train.py takes it before Hydra writes
        # anything, so a failed run knows whether the folder is its own to remove
        # (identity.removed_on_failure).
        self.created: bool | None = None

    def acquire(self) -> RunLock:
        self.created = not self.run_dir.exists()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunLockedError(self._refusal()) from None
        except OSError as err:
            os.close(fd)
            if err.errno not in _UNSUPPORTED:
                raise
            warnings.warn(
                f"{self.path}: this file system does not support flock ({err.strerror}), so "
                "nothing stops a second run from training in this folder at the same time. On "
                "Lustre, mount with -o flock.",
                stacklevel=2,
            )
            _HELD_DIRS[self.run_dir.resolve()] = self  # warned once: train.py does not retry
            return self
        holder = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "command": " ".join(sys.argv),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        self.fd = fd
        _HELD.add(fd)
        _HELD_DIRS[self.run_dir.resolve()] = self
        return self

    def _refusal(self) -> str:
        h = read_holder(self.path)
        who = (
            f"{h.get('host', '?')} pid {h.get('pid', '?')}, started {h.get('started', '?')}"
            if h
            else "a process that has not written its name yet"
        )
        return (
            f"{self.run_dir} is in use by another run ({who}; lock {self.path}). Two processes "
            "training in one folder overwrite each other's checkpoints. Wait for it to finish or "
            "stop it (if it is a duplicate submission or an old job still running), or start this "
            "one elsewhere with run_name=<another name> or paths.output_dir=<another folder>. A "
            "killed run releases the lock by itself: there is no lock file to delete."
        )

    def release(self) -> None:
        if _HELD_DIRS.get(self.run_dir.resolve()) is self:
            del _HELD_DIRS[self.run_dir.resolve()]
        if self.fd is None:
            return
        _HELD.discard(self.fd)
        with contextlib.suppress(OSError):
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def is_first_process() -> bool:
    """Whether this is the job's first process (global rank 0), from the launchers' environment
    (torchrun: RANK, LOCAL_RANK, GROUP_RANK; SLURM: SLURM_PROCID; Lightning's own launcher:
    LOCAL_RANK, NODE_RANK), before torch.distributed exists. Only it takes the run lock: the other
    ranks of the same run must not be refused."""
    names = ("RANK", "LOCAL_RANK", "GROUP_RANK", "NODE_RANK", "SLURM_PROCID")
    return all(os.environ.get(n, "0") == "0" for n in names)


def held_lock(run_dir: str | os.PathLike) -> RunLock | None:
    """The lock on `run_dir` that this process holds, if any. (A second flock on a new descriptor
    of the same file would be refused even within one process.)"""
    return _HELD_DIRS.get(Path(run_dir).resolve())


@contextlib.contextmanager
def run_lock(run_dir: str | os.PathLike) -> Iterator[RunLock | None]:
    """Hold `run_dir`'s lock for the block on the job's first process; a no-op on the others, and
    on a folder whose lock this process already holds (train.py's Hydra callback took it before
    Hydra wrote into the folder; it releases it)."""
    if not is_first_process():
        yield None
        return
    held = held_lock(run_dir)
    if held is not None:
        yield held
        return
    with RunLock(run_dir) as lock:
        # Taken here (a -m sweep's job), after Hydra made the folder: whether this command made
        # it is unknown.
        lock.created = None
        yield lock
