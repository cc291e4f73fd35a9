"""The run lock as a Hydra callback, so that a refused second process writes nothing into the busy
folder.

Hydra's `run_job` creates the run folder, opens the job log (`train.log`) and writes `.hydra/`
(config.yaml, hydra.yaml, overrides.yaml) before it calls the task function, and before its
`on_job_start` callbacks: a lock taken in train.py's `main()` refuses the second process only after
it has overwritten the running job's `.hydra/` files and appended to its log. `on_run_start` runs
before all of that, with the composed config, so the lock is taken there (single runs; the jobs of a
`-m` sweep take it in `main()`, as before). `main()`'s `run_lock` then finds it held by this process
and keeps it; `on_run_end` releases it.

Hydra turns an exception in a callback into a warning and goes on, so a refusal prints the
RunLockedError's message and exits with status 1 (SystemExit passes through).
"""

from __future__ import annotations

import os
import sys
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from ditkit.checkpoints.lock import RunLock, RunLockedError, held_lock, is_first_process


class RunLockCallback(Callback):
    """`hydra.callbacks.run_lock`: hold `<hydra.run.dir>/run.lock` from before Hydra writes into
    the folder until the run ends (first process of the job only)."""

    def __init__(self) -> None:
        self.lock: RunLock | None = None

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not is_first_process():
            return
        # hydra.run.dir interpolates ${hydra:...}, which reads the global HydraConfig: set it now,
        # as run_job does right after this callback.
        HydraConfig.instance().set_config(config)
        run_dir = os.path.abspath(str(OmegaConf.select(config, "hydra.run.dir")))
        if held_lock(run_dir) is not None:
            return
        try:
            self.lock = RunLock(run_dir).acquire()
        except RunLockedError as err:
            print(f"RunLockedError: {err}", file=sys.stderr, flush=True)
            raise SystemExit(1) from None

    def on_run_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None
