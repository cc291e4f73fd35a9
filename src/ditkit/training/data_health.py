"""Damaged data made visible: `data/skipped` on every logging step, the total at the end, and a stop
when more of the stream than `data.max_skipped_fraction` is damaged.

The data module skips and counts what it cannot read (a corrupt `.npy`, a truncated or vanished
shard) so that one bad file does not end a week-long run; this callback makes sure a run whose data
is mostly damaged does not train on the remainder in silence.
"""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

# Below this many damaged items the share is not judged: a handful of bad samples early on is noise,
# not a damaged data set (1 bad sample in the first 50 is 2%, over the default 1%).
MIN_SKIPPED = 10


class DamagedDataError(RuntimeError):
    """More of the training stream than data.max_skipped_fraction could not be read."""


class DataHealth(L.Callback):
    """Logs `data/skipped` (damaged samples and shards, summed over ranks) with the other train
    metrics, prints the total at the end of training, and raises `DamagedDataError` on every rank
    together once at least `MIN_SKIPPED` items were skipped and they exceed the data module's
    `max_skipped_fraction` of everything read (skipped + read intact).

    Works with any data module that has `skipped` and `samples_read` (LatentShardsDataModule); a
    no-op for others."""

    def _totals(self, trainer: L.Trainer, pl_module: L.LightningModule) -> tuple[int, int] | None:
        dm = trainer.datamodule
        if dm is None or not hasattr(dm, "skipped") or not hasattr(dm, "samples_read"):
            return None
        counts = torch.tensor([dm.skipped, dm.samples_read], dtype=torch.float64)
        # One all-reduce: every rank logs the same total and takes the same decision (a rank that
        # raised alone would leave the others waiting in the next collective).
        counts = trainer.strategy.reduce(counts.to(pl_module.device), reduce_op="sum").cpu()
        return int(counts[0]), int(counts[1])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # The step Lightning writes the logged metrics on (its private flag; the same on every rank).
        if not trainer._logger_connector.should_update_logs:
            return
        totals = self._totals(trainer, pl_module)
        if totals is None:
            return
        skipped, read = totals
        pl_module.log("data/skipped", float(skipped), on_step=True, on_epoch=False)
        limit = trainer.datamodule.max_skipped_fraction
        if skipped >= MIN_SKIPPED and skipped > limit * (skipped + read):
            raise DamagedDataError(
                f"{skipped} damaged samples or shards were skipped against {read} read intact "
                f"({skipped / (skipped + read):.1%} of the stream, over "
                f"data.max_skipped_fraction={limit}). The warnings above name them: rewrite the "
                "shards (python -m data_pipelines.extract_latents with the same out=), fix the "
                "storage, or raise data.max_skipped_fraction to train on what is readable."
            )

    def on_train_end(self, trainer, pl_module) -> None:
        totals = self._totals(trainer, pl_module)
        if totals is not None:
            skipped, read = totals
            share = skipped / (skipped + read) if skipped + read else 0.0
            rank_zero_info(
                f"ditkit: {skipped} damaged samples or shards skipped over the run "
                f"({share:.2%} of {skipped + read} read)"
            )
