"""FID during training: a Lightning callback that scores the EMA model every N optimizer steps.

Every rank samples its share of `num_samples` images with the module's EMA weights
(`pl_module.ema`), the Inception statistics are merged exactly across ranks, and `val/fid` (and
`val/is`, ...) are logged with a grid of samples (`val/samples`). The global RNG is left as it was
(sampling draws from its own seeded streams inside `fork_rng`), so a run with this callback resumes
exactly like one without.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from PIL import Image

from ditkit.checkpoints.atomic import atomic_write
from ditkit.data.vae import vae_from_manifest
from ditkit.objectives.samplers import resolve

from .decoding import make_decoder
from .inception import inception_fingerprint, load_inception
from .reference import MAKE_ONE, check_reference, load_reference
from .runner import InceptionMetrics, SamplingPlan, sample_and_score
from .samples_io import image_grid


def sampling_terms(pl_module) -> dict:
    """{"terms": ...} for objective.sample when the module's objective has terms sampling needs."""
    terms = getattr(pl_module, "sampling_terms", lambda: {})()
    return {"terms": terms} if terms else {}


class FIDCallback(Callback):
    """Every `every_n_steps` optimizer steps: FID (and IS / KID / PR) of `num_samples` EMA samples
    vs `reference`.

    reference: a FID reference .npz (data_pipelines.fid_reference) at the data's image size.
    inception_weights: a local Inception weights file, or None for torch-fidelity's download.
    batch_size: per rank. sampler: null | name | {name, steps, options}; null parts mean the
    objective's cheap preview sampler (ddim for ddpm, euler for flow) at its default steps: a
    training-time FID tracks progress, it is not the paper number.
    vae: a local copy of the manifest's VAE (None: as the manifest names it). Results also go to
    <default_root_dir>/fid/step_XXXXXXX.{json,png}.
    """

    def __init__(
        self,
        reference: str | None,
        every_n_steps: int = 10000,
        num_samples: int = 5000,
        batch_size: int = 64,
        inception_weights: str | None = None,
        sampler: str | dict[str, Any] | None = None,
        cfg_scale: float = 1.0,
        guidance_channels: int | None = None,
        guidance_interval: Sequence[float] | None = None,
        seed: int = 0,
        vae: str | None = None,
        metrics: Sequence[str] = ("fid", "is"),
        grid_images: int = 16,
    ):
        if every_n_steps < 1 or num_samples < 2 or batch_size < 1:
            raise ValueError(
                f"callbacks.fid: every_n_steps ({every_n_steps}) and batch_size ({batch_size}) must be >= 1, "
                f"num_samples ({num_samples}) >= 2"
            )
        self.reference_path, self.inception_weights = reference, inception_weights
        self.every_n_steps, self.num_samples, self.batch_size = (
            every_n_steps,
            num_samples,
            batch_size,
        )
        self.sampler = sampler
        self.guidance = {
            "cfg_scale": float(cfg_scale),
            "guidance_channels": guidance_channels,
            "guidance_interval": None
            if guidance_interval is None
            else [float(v) for v in guidance_interval],
        }
        self.seed, self.vae, self.metrics, self.grid_images = seed, vae, tuple(metrics), grid_images
        InceptionMetrics(self.metrics)  # unknown metric names fail here, at instantiation
        if reference is None and {"fid", "kid", "prc"} & set(self.metrics):
            raise ValueError(
                f"callbacks.fid.reference is needed for {list(self.metrics)} ({MAKE_ONE})"
            )
        self.reference = self.extractor = self._decode = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Read the reference before training starts: a missing or unfit file fails now, not after
        hours."""
        if self.reference_path is not None:
            try:
                self.reference = load_reference(self.reference_path)
            except FileNotFoundError as err:
                raise FileNotFoundError(f"callbacks.fid.reference: {err}") from err

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.extractor = load_inception(
            self.inception_weights, pl_module.device, key="callbacks.fid.inception_weights"
        )
        image_size = getattr(trainer.datamodule, "image_size", None)
        if image_size is not None and self.reference is not None:
            check_reference(
                self.reference,
                f"callbacks.fid.reference={self.reference_path}",
                image_size,
                inception_fingerprint(self.extractor),
            )
        if tuple(pl_module.model.condition_keys) != ("y",):
            raise ValueError(
                "callbacks.fid samples balanced class labels, but the backbone "
                f"({type(pl_module.model).__name__}) takes {list(pl_module.model.condition_keys)}: "
                "drop callbacks.fid and sample prompts with evaluate.py prompts=FILE"
            )
        spec, steps, options = resolve(self.sampler, pl_module.objective.name, "preview")
        if getattr(trainer, "datamodule", None) is not None:  # a VAE it cannot fetch: fail now
            self._decode = self._decoder(trainer, pl_module)
        self.sample_kwargs = {"sampler": spec.name, "steps": steps, **options, **self.guidance}

    def _decoder(self, trainer: L.Trainer, pl_module: L.LightningModule):
        trainer.datamodule.setup()
        vae = vae_from_manifest(trainer.datamodule.manifest, self.vae, "callbacks.fid.vae=DIR")
        return make_decoder(vae, pl_module.device)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx
    ) -> None:
        step = trainer.global_step
        if (
            step == 0
            or step % self.every_n_steps
            or (batch_idx + 1) % trainer.accumulate_grad_batches
        ):
            return
        result, grid = self.score(trainer, pl_module)
        # Every rank holds the same merged numbers: logged without a sync, and usable as a
        # checkpoint monitor.
        pl_module.log_dict(
            {f"val/{k}": float(v) for k, v in result.items() if k != "num_samples"},
            on_step=True,
            on_epoch=False,
        )
        if trainer.is_global_zero:
            folder = Path(trainer.default_root_dir) / "fid"
            folder.mkdir(parents=True, exist_ok=True)
            with atomic_write(folder / f"step_{step:07d}.json", "w") as f:
                json.dump({"step": step, **result, **self.sample_kwargs}, f)
            with atomic_write(folder / f"step_{step:07d}.png") as f:
                Image.fromarray(grid).save(f, format="PNG")
            for logger in trainer.loggers:
                if hasattr(logger, "log_image"):
                    logger.log_image(key="val/samples", images=[grid], step=step)
            rank_zero_info(f"step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in result.items()))

    def score(
        self, trainer: L.Trainer, pl_module: L.LightningModule
    ) -> tuple[dict[str, float], Any]:
        """Sample and score on every rank (collective); returns the metrics and a grid (rows*H,
        cols*W, 3) uint8."""
        model = pl_module.ema
        if self._decode is None:
            self._decode = self._decoder(trainer, pl_module)
        plan = SamplingPlan(
            num_samples=self.num_samples,
            batch_size=self.batch_size,
            num_classes=model.num_classes,
            latent_shape=(model.in_channels, model.input_size, model.input_size),
            seed=self.seed,
            # The EMA of the terms sampling needs (REG's class-token heads), with the EMA backbone.
            sample_kwargs={**self.sample_kwargs, **sampling_terms(pl_module)},
        )
        scores = InceptionMetrics(self.metrics)
        kept = sample_and_score(
            model,
            pl_module.objective,
            self._decode,
            self.extractor,
            plan,
            scores,
            rank=trainer.global_rank,
            world_size=trainer.world_size,
            device=pl_module.device,
            autocast=trainer.precision_plugin.forward_context,
            progress=False,
            keep=self.grid_images,
            lockstep=True,
        )
        result = scores.compute(self.reference, pl_module.device)
        return result, image_grid(kept) if trainer.is_global_zero else None
