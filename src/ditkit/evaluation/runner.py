"""Sample a model on every rank, stream the images through Inception, and score them.

`sample_and_score` is what `evaluate.py` and the training-time FID callback both call; it must be
called on every rank (it all-reduces the statistics at the end).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from .encoder_fd import is_fd_metric
from .inception import inception_features
from .reference import Reference
from .samples_io import PartStore
from .sampling import balanced_labels, generate_batch, plan_batches, sample_noise
from .stats import (
    FeatureStats,
    all_gather_rows,
    inception_score,
    kernel_inception_distance,
    precision_recall,
)

METRICS = ("fid", "is", "kid", "prc")


@dataclass
class SamplingPlan:
    """What to sample: `num_samples` images in batches of `batch_size` (per rank) from latents of
    `latent_shape` (C, h, w).

    sample_kwargs go to `objective.sample` (sampler, steps, cfg_scale, guidance_channels,
    guidance_interval).
    """

    num_samples: int
    batch_size: int
    num_classes: int
    latent_shape: tuple[int, int, int]
    seed: int = 0
    sample_kwargs: dict[str, Any] = field(default_factory=dict)


def _rows(chunks: list[torch.Tensor], dim: int) -> torch.Tensor:
    """The chunks stacked into (n, dim); (0, dim) for a rank that had no batch."""
    return torch.cat(chunks) if chunks else torch.zeros(0, dim)


class InceptionMetrics:
    """Streaming metric state of one rank: FID statistics always, logits for IS, pool features for
    KID / PR, and for each `fd_<encoder>` metric that encoder's statistics (`encoders`: {metric:
    EncoderStats}, fed the images by `add_images`)."""

    def __init__(self, metrics: Sequence[str] = ("fid", "is"), encoders: dict | None = None):
        unknown = {m for m in metrics if m not in METRICS and not is_fd_metric(m)}
        if unknown:
            raise ValueError(
                f"unknown metrics {sorted(unknown)}; choose from {list(METRICS)} or fd_<encoder>"
            )
        self.encoders = dict(encoders or {})
        missing = [m for m in metrics if is_fd_metric(m) and m not in self.encoders]
        if missing:
            raise ValueError(f"metrics {missing} need their encoders (EncoderStats)")
        self.metrics = tuple(metrics)
        self.stats = FeatureStats()
        self.logits: list[torch.Tensor] = []
        self.pool: list[torch.Tensor] = []
        self.index: list[torch.Tensor] = []

    def add(self, pool: torch.Tensor, logits: torch.Tensor, start: int) -> None:
        """pool: (n, 2048), logits: (n, 1008) of the global samples start..start+n-1."""
        self.stats.update(pool)
        self.index.append(torch.arange(start, start + pool.shape[0]))
        if "is" in self.metrics:
            self.logits.append(logits.detach().float().cpu())
        if "kid" in self.metrics or "prc" in self.metrics:
            self.pool.append(pool.detach().float().cpu())

    def add_images(self, images: torch.Tensor, device: torch.device | str) -> None:
        """images: (n, 3, H, W) uint8, for the encoder-space metrics (run on `device`)."""
        for stats in self.encoders.values():
            stats.update(images.to(device))

    def _gather(
        self, chunks: list[torch.Tensor], dim: int, device: torch.device | str
    ) -> torch.Tensor:
        """This rank's rows -> every rank's rows in global sample order (IS splits and KID subsets
        depend on it)."""
        rows = all_gather_rows(_rows(chunks, dim), device)
        index = all_gather_rows(
            torch.cat(self.index) if self.index else torch.zeros(0, dtype=torch.int64), device
        )
        return rows[torch.argsort(index)]

    def compute(
        self, reference: Reference | None, device: torch.device | str = "cpu"
    ) -> dict[str, float]:
        """Merge the ranks (collective: call on every rank) and score against `reference`."""
        needs_reference = {"fid", "kid", "prc", *self.encoders} & set(self.metrics)
        if reference is None and needs_reference:
            raise ValueError(
                f"{sorted(needs_reference)} need reference statistics: set fid.reference=FILE.npz"
            )
        self.stats.all_reduce(device)
        out: dict[str, float] = {"num_samples": self.stats.count}
        if "fid" in self.metrics:
            mu, sigma = self.stats.mean_cov()
            out["fid"] = reference.fid(mu, sigma)
        for metric, stats in self.encoders.items():
            stats.stats.all_reduce(device)
            out[metric] = stats.distance(reference.encoders[stats.encoder.name])
        if "is" in self.metrics:
            logits = self._gather(self.logits, 1008, device)
            out["is"], out["is_std"] = inception_score(logits)
        if "kid" in self.metrics or "prc" in self.metrics:
            fake = self._gather(self.pool, 2048, device)
            if reference.features is None:
                raise ValueError(
                    "kid / prc need reference features: make the reference with features=N (e.g. 10000)"
                )
            real = torch.from_numpy(reference.features)
            if "kid" in self.metrics:
                out["kid"], out["kid_std"] = kernel_inception_distance(fake, real)
            if "prc" in self.metrics:
                out["precision"], out["recall"] = precision_recall(fake, real)
        return out


def sample_and_score(
    model: Callable[..., torch.Tensor],
    objective: Any,
    decode: Callable[[torch.Tensor], torch.Tensor],
    extractor: torch.nn.Module,
    plan: SamplingPlan,
    metrics: InceptionMetrics,
    *,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | str = "cpu",
    autocast: Callable[[], Any] = contextlib.nullcontext,
    store: PartStore | None = None,
    progress: bool = True,
    keep: int = 0,
    lockstep: bool = False,
) -> torch.Tensor:
    """Sample this rank's share of `plan`, feed `metrics`; returns up to `keep` of its images (k, 3,
    H, W) uint8.

    With a `store`, every batch is written as a part and batches already there are read back instead
    of sampled again (resume). The model runs on `device`; guidance uses the model's null_condition.
    lockstep: every rank runs as many model batches as the busiest one (a rank with one batch fewer
    samples a throw-away batch), for sharded (FSDP2) models whose forward is a collective.
    """
    device = torch.device(device)
    labels_all = balanced_labels(plan.num_samples, plan.num_classes, plan.seed)
    batches = plan_batches(plan.num_samples, plan.batch_size, rank, world_size)
    kept: list[torch.Tensor] = []
    share = sum(b - a for a, b in batches)
    bar = tqdm(
        total=share,
        unit="img",
        desc=f"sampling (rank 0 of {world_size})",
        disable=not (progress and rank == 0),
    )
    t0, fresh = time.perf_counter(), 0
    for start, stop in batches:
        part = store.load(start, stop - start) if store is not None else None
        if part is not None:
            images = torch.from_numpy(part["images"]).permute(0, 3, 1, 2)
            pool, logits = torch.from_numpy(part["pool"]), torch.from_numpy(part["logits"])
        else:
            labels = labels_all[start:stop]
            noise = sample_noise(start, stop, plan.latent_shape, plan.seed).to(device)
            images = generate_batch(
                model,
                objective,
                decode,
                labels.to(device),
                noise,
                seed=plan.seed,
                start=start,
                sample_kwargs=plan.sample_kwargs,
                autocast=autocast,
            )
            pool, logits = (f.cpu() for f in inception_features(extractor, images))
            if store is not None:
                hwc = images.permute(0, 2, 3, 1).numpy()
                store.save(
                    start, hwc, labels.numpy().astype(np.int64), pool.numpy(), logits.numpy()
                )
            fresh += stop - start
        metrics.add(pool, logits, start)
        metrics.add_images(images, device)
        if sum(k.shape[0] for k in kept) < keep:
            kept.append(images)
        bar.update(stop - start)
        if fresh:
            rate = fresh / (time.perf_counter() - t0)
            bar.set_postfix_str(f"{rate * world_size:.2f} img/s on all ranks")
    bar.close()
    rounds = math.ceil(
        math.ceil(plan.num_samples / plan.batch_size) / world_size
    )  # batches of the busiest rank
    for _ in range(rounds - len(batches) if lockstep else 0):
        stop = min(plan.batch_size, plan.num_samples)
        generate_batch(
            model,
            objective,
            lambda z: z,
            labels_all[:stop].to(device),
            sample_noise(0, stop, plan.latent_shape, plan.seed).to(device),
            seed=plan.seed,
            start=0,
            sample_kwargs=plan.sample_kwargs,
            autocast=autocast,
        )
    return torch.cat(kept)[:keep] if kept else torch.zeros(0, dtype=torch.uint8)
