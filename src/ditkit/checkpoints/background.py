"""Asynchronous single-file checkpoints: one host copy, then the write in a background thread.

Training pauses only while `host_copy` copies every tensor of the checkpoint to fresh host memory
(from the GPU: one device-to-host copy; on the CPU: one memcpy), so that the next optimizer steps
may change the weights while the copy is being written. The write is the synchronous one
(`write_checkpoint_file`: streamed into a temporary file beside the target, fsynced, renamed), so
a kill mid-write still leaves the previous checkpoint intact. One thread writes one checkpoint at a
time, in order; `wait()` returns the first failure, which the checkpoint callback raises at the next
save or at the end of training.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch


def host_copy(obj: Any) -> Any:
    """`obj` with every tensor replaced by a copy in host memory (dicts, lists, tuples walked);
    other values are kept (they are rebuilt for each checkpoint and not changed by training)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return type(obj)((k, host_copy(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        return type(obj)(host_copy(v) for v in obj)
    return obj


class BackgroundWriter:
    """Writes checkpoints one at a time in a background thread; remembers the first failure."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ditkit-checkpoint")
        self._pending: list[tuple[int, str, Future]] = []  # (step, path, write or action)

    def submit(self, checkpoint: dict, filepath: str, step: int) -> None:
        """Copy `checkpoint` (taken at optimizer step `step`) to host memory now; write it to
        `filepath` in the background."""
        from .saving import write_checkpoint_file

        snapshot = host_copy(checkpoint)
        future = self._pool.submit(write_checkpoint_file, snapshot, filepath)
        self._pending.append((step, str(filepath), future))

    def then(self, action: Callable[[], None]) -> None:
        """Run `action` in the background after the writes queued so far, if they all succeed
        (retention: remove an older checkpoint only once the newer one is committed)."""
        before = [f for _, _, f in self._pending]

        def run() -> None:
            if all(f.exception() is None for f in before):
                action()

        step = self._pending[-1][0] if self._pending else -1
        self._pending.append((step, "", self._pool.submit(run)))

    def wait(self, before_step: int | None = None) -> tuple[str | None, Exception | None]:
        """Block until the writes queued before optimizer step `before_step` (all, with None) are
        done -> (path, error) of the first failed one, or (None, None). Writes queued at the same
        step (Lightning's top-k file and last.ckpt) do not wait for each other."""
        done = [p for p in self._pending if before_step is None or p[0] < before_step]
        self._pending = [p for p in self._pending if p not in done]
        failure: tuple[str | None, Exception | None] = (None, None)
        for _, path, future in done:
            error = future.exception()
            if error is not None and failure[1] is None:
                failure = (path or None, error)
        return failure
