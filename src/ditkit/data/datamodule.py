"""`LatentShardsDataModule`: latent shards -> batch dicts ``{"x": latents float32 (B, C, H, W)
scaled, "y": labels int64 (B,)}`` (or text fields) for any number of ranks, with a stream position
that checkpoints resume exactly."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import lightning as L
import torch
import webdataset as wds

from ditkit.data.captions import build_captioned_digits
from ditkit.data.digits import build_digits
from ditkit.data.format import (
    MANIFEST,
    DataFormatError,
    decode_image,
    decode_moments,
    decode_pixel_moments,
    has_images,
    is_pixel_set,
    moments_shape,
    parse_manifest,
)
from ditkit.data.manifest_keys import TEXT_KEYS, check_against_manifest
from ditkit.data.remote import check_reachable, open_shard
from ditkit.data.stream import SkipCounter, TrainStream

BUILTINS = {"digits": build_digits, "digits_t2i": build_captioned_digits}


def default_num_workers(requested: int | None, cap: int = 8) -> int:
    """`requested`, or for None the CPU cores this process may use (its affinity mask, which SLURM
    and containers set), at most `cap`: a fixed 8 made every run on a small machine warn."""
    if requested is not None:
        return requested
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(cap, cores or 1))


class ResumableLoader:
    """The training loader: each pass over it is one epoch of ``len(self)`` batches
    (`WebLoader.with_epoch`, the same count on every rank, so DDP never waits at an epoch end for a
    rank that ran dry).

    It tracks the *consumer's* place in the stream, (epoch, batches of it used), which is what a
    checkpoint must store: a trainer fetches ahead of training, so the batches handed out can exceed
    those used. ``consumed`` counts the batches the consumer has taken in total (the trainer's
    fit-loop counter); without one, every batch handed out counts as used. A new pass continues from
    the consumer's place. Workers are not persistent: each pass starts them with its epoch's seed.
    """

    def __init__(
        self,
        stream: TrainStream,
        batches_per_epoch: int,
        num_workers: int,
        consumed: Callable[[], int | None] = lambda: None,
    ) -> None:
        # `stream`, not `dataset`: Lightning would take this for a DataLoader of a sized
        # IterableDataset and warn.
        self.stream, self.batches_per_epoch, self.num_workers = (
            stream,
            batches_per_epoch,
            num_workers,
        )
        self._consumed = consumed
        self._epoch, self._start = 0, 0  # where the current (or next) pass starts
        self._base: int | None = (
            None  # consumer's counter when the current pass began; None: not begun
        )
        self._handed_out = 0

    def __len__(self) -> int:
        return self.batches_per_epoch

    def __iter__(self) -> Iterator[dict]:
        epoch, start = self.position()
        if start >= self.batches_per_epoch:
            epoch, start = epoch + 1, 0
        self._epoch, self._start, self._base, self._handed_out = epoch, start, self._consumed(), 0
        self.stream.epoch, self.stream.start_batch = epoch, start
        loader = wds.WebLoader(
            self.stream,
            batch_size=None,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
        ).with_epoch(self.batches_per_epoch - start)
        for batch in loader:
            self._handed_out += 1
            yield batch

    def position(self) -> tuple[int, int]:
        """(epoch, batches of that epoch the consumer has used)."""
        now = self._consumed()
        used = now - self._base if now is not None and self._base is not None else self._handed_out
        return self._epoch, self._start + used

    def state_dict(self) -> dict[str, int]:
        epoch, batches = self.position()
        return {
            "epoch": epoch,
            "batches": batches,
            "seed": self.stream.seed,
            "num_workers": self.num_workers,
            "world_size": self.stream.world_size,
            "batch_size": self.stream.batch_size,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        now = self.state_dict()
        changed = [
            k for k in ("seed", "num_workers", "world_size", "batch_size") if state[k] != now[k]
        ]
        if changed:
            warnings.warn(
                "Resuming the data stream with different "
                f"{', '.join(f'{k} ({state[k]} -> {now[k]})' for k in changed)}:"
                " training continues at the saved place but the sample order differs from an "
                "uninterrupted run.",
                stacklevel=2,
            )
        self._epoch, self._start, self._base, self._handed_out = (
            int(state["epoch"]),
            int(state["batches"]),
            None,
            0,
        )


class LatentShardsDataModule(L.LightningDataModule):
    """Batches of VAE latents from a latent shard set (see `ditkit.data.format`), as dicts:
    ``{"x": (B, C, H, W) float32, "y": (B,) int64}`` for labelled shards, ``{"x", "context",
    "pooled"}`` for captioned ones, plus ``"key"`` with return_keys. Fields the training module does
    not know pass through it to the objective.

    Args:
        latent_size, latent_channels: the latent grid the model is built for; checked against the
            manifest.
        num_classes, image_size: likewise checked against the manifest.
        root: a shard folder (manifest.json + train-*.tar). Or ``urls``: a brace pattern / list of
            shard URLs (local paths, ``pipe:`` commands, object-store URLs WebDataset opens), with
            ``manifest`` the manifest's path or URL (default: ``manifest.json`` beside the first
            shard).
        num_workers: loader processes; None: the CPU cores available, at most 8.
        batch_size: per rank. seed: of the stream (the same seed and world size give the same
            batches).
        shuffle_buffer: samples mixed in each worker. samples_per_epoch: default the manifest's
            count; one epoch is ``samples_per_epoch // (batch_size * world_size)`` batches on every
            rank.
        builtin: ``"digits"`` builds the built-in set at ``root`` in `prepare_data` when it is
            missing.
        return_keys: batches gain a "key" field, the sample keys (tests and debugging).
        flip: train on the mirror image half the time (DiT's augmentation); off for data whose
            mirror image is something else, such as digits.
        context_len, context_dim, pooled_dim: set all three (as the manifest's ``text`` section
            says) to train on captioned shards: batches then carry ``{"context": (B, L, D),
            "pooled": (B, P)}`` float32 text embeddings in place of the labels (see
            docs/text_to_image.md).
        images: batches also carry "image", the crop the VAE saw ((B, 3, S, S) uint8, flipped with
            the latent), for frozen vision encoders (``encoder=`` sets it); the shards must have
            been extracted with ``keep_images=true``, which is checked before training.
        max_skipped_fraction: the damaged share of the stream (skipped samples and shards over
            those read) above which training stops (`ditkit.training.DataHealth`); 1 never stops.
    """

    def __init__(
        self,
        latent_size: int,
        latent_channels: int,
        num_classes: int,
        image_size: int,
        root: str | None = None,
        urls: str | list[str] | None = None,
        manifest: str | None = None,
        batch_size: int = 32,
        num_workers: int | None = None,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        samples_per_epoch: int | None = None,
        builtin: str | None = None,
        return_keys: bool = False,
        flip: bool = True,
        context_len: int | None = None,
        context_dim: int | None = None,
        pooled_dim: int | None = None,
        images: bool = False,
        max_skipped_fraction: float = 0.01,
    ) -> None:
        super().__init__()
        self.images = bool(images)
        if not 0.0 <= max_skipped_fraction <= 1.0:
            raise ValueError(
                f"data.max_skipped_fraction={max_skipped_fraction} must lie in [0, 1] (1 never "
                "stops the run)"
            )
        self.max_skipped_fraction = max_skipped_fraction
        text = (context_len, context_dim, pooled_dim)
        if any(v is not None for v in text) and not all(v is not None for v in text):
            raise ValueError(
                "Set all of data.context_len, data.context_dim, data.pooled_dim (captioned shards), or none."
            )
        self.text = text if context_len is not None else None
        if (root is None) == (urls is None):
            raise ValueError(
                "Set exactly one of data.root=<shard folder> and data.urls=<shard URLs>."
            )
        if builtin is not None and (builtin not in BUILTINS or root is None):
            raise ValueError(
                f"data.builtin={builtin!r}: choose one of {sorted(BUILTINS)}, with data.root set"
            )
        for name, value in (
            ("batch_size", batch_size),
            ("latent_size", latent_size),
            ("image_size", image_size),
        ):
            if value < 1:
                raise ValueError(f"data.{name}={value} must be positive")
        self.latent_shape = (latent_channels, latent_size, latent_size)
        self.num_classes, self.image_size = num_classes, image_size
        self.root = os.path.abspath(os.path.expanduser(root)) if root is not None else None
        self.urls, self.manifest_url = urls, manifest
        self.batch_size, self.seed = batch_size, seed
        self.num_workers = default_num_workers(num_workers)
        self.shuffle_buffer, self.samples_per_epoch = shuffle_buffer, samples_per_epoch
        self.builtin, self.return_keys = builtin, return_keys
        self.flip = flip
        self.manifest: dict[str, Any] | None = None
        self._counter: SkipCounter | None = None
        self._train_loader: ResumableLoader | None = None
        self._resume: dict[str, int] | None = None

    # -- set-up and checks
    # ---------------------------------------------------------------------------

    def prepare_data(self) -> None:
        """Build the built-in data set once (Lightning calls this on one process per node)."""
        if self.builtin is not None and not os.path.isfile(os.path.join(self.root, MANIFEST)):
            BUILTINS[self.builtin](self.root, image_size=self.image_size)

    def setup(self, stage: str | None = None) -> None:
        if self.manifest is not None:
            return
        if self.builtin is not None and self.trainer is None:
            self.prepare_data()  # used without a Trainer
        self.manifest, self.shard_urls = open_manifest(self.root, self.urls, self.manifest_url)
        self._check(self.manifest, self.shard_urls, "data")
        self._counter = SkipCounter()

    def _check(self, manifest: dict[str, Any], shard_urls: list[str], key: str) -> None:
        """Fail before training if the shards do not fit the configured model/data, naming the
        mismatch."""
        config = {
            "latent_channels": self.latent_shape[0],
            "latent_size": self.latent_shape[1],
            "image_size": self.image_size,
            "num_classes": self.num_classes,
        }
        if self.text is not None:
            if not manifest.get("text"):
                raise DataFormatError(
                    f"{key}.context_len/context_dim/pooled_dim are set but the shards carry no text "
                    "embeddings: make a "
                    "captioned set with python -m data_pipelines.extract_text_embeddings (or unset "
                    "them to train on labels)."
                )
            config.update(zip(TEXT_KEYS, self.text, strict=True))
        check_against_manifest(config, manifest, key)
        stored = tuple(manifest["latent_shape"])
        if self.images and not has_images(manifest):
            raise DataFormatError(
                f"A frozen vision encoder (encoder=...) reads the images, but the shards at "
                f"{self.root or shard_urls[0]} hold latents only (manifest without 'images'): "
                "re-extract them with python -m data_pipelines.extract_latents ... keep_images=true "
                "(the built-in digits: delete the folder to rebuild it), or set encoder=none."
            )
        local = [u for u in shard_urls if "://" not in u and not u.startswith("pipe:")]
        missing = [u for u in local if not os.path.isfile(u)]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} of {len(shard_urls)} shards are missing, e.g. {missing[:3]}; rerun "
                "data_pipelines.extract_latents with the same out= to rewrite them."
            )
        if local:  # the first sample must have the manifest's shape, or the manifest belongs to other shards
            first = next(iter(wds.tariterators.tarfile_samples([{"url": local[0]}])), None)
            try:
                if first is None:
                    raise DataFormatError("no samples")
                if is_pixel_set(manifest):
                    decode_pixel_moments(first, moments_shape(manifest))
                else:
                    decode_moments(first, "moments.npy", moments_shape(manifest))
                if self.images:
                    decode_image(first, self.image_size)
            except DataFormatError as err:
                raise DataFormatError(
                    f"{local[0]}: {err} (manifest latent_shape {list(stored)})"
                ) from err

    # -- loaders
    # ------------------------------------------------------------------------------------

    def _rank_world(self) -> tuple[int, int]:
        if self.trainer is not None:
            return self.trainer.global_rank, self.trainer.world_size
        rank, world_size, _, _ = (
            wds.utils.pytorch_worker_info()
        )  # torch.distributed or RANK/WORLD_SIZE
        return rank, world_size

    def _trainer_consumed(self) -> int | None:
        """Batches training has taken so far: the fit loop's counter, which (unlike what the loader
        has handed out) does not run ahead with Lightning's prefetching."""
        if self.trainer is None:
            return None
        return self.trainer.fit_loop.epoch_loop.batch_progress.total.ready

    @property
    def scale_factor(self) -> float:
        self.setup()
        return float(self.manifest["vae"]["scale_factor"])

    @property
    def skipped(self) -> int:
        """Damaged samples and shards skipped so far by this rank's workers (`DataHealth` logs the
        sum over ranks as ``data/skipped``)."""
        return self._counter.count if self._counter is not None else 0

    @property
    def samples_read(self) -> int:
        """Samples read intact so far by all workers (the denominator of the damaged share)."""
        return self._counter.read if self._counter is not None else 0

    @property
    def batches_per_epoch(self) -> int:
        self.setup()
        samples = self.samples_per_epoch or self.manifest["num_samples"]
        n = samples // (self.batch_size * self._rank_world()[1])
        if n < 1:
            raise ValueError(
                f"{samples} samples per epoch are fewer than one batch of {self.batch_size} per rank"
            )
        return n

    def train_dataloader(self) -> ResumableLoader:
        self.setup()
        # A rebuilt loader (Trainer(reload_dataloaders_every_n_epochs=...)) continues where the old
        # one was.
        state = self._resume if self._resume is not None else self.state_dict() or None
        rank, world_size = self._rank_world()
        stream = TrainStream(
            urls=self.shard_urls,
            moments_shape=moments_shape(self.manifest),
            scale=float(self.manifest["vae"]["scale_factor"]),
            batch_size=self.batch_size,
            seed=self.seed,
            rank=rank,
            world_size=world_size,
            counter=self._counter,
            return_keys=self.return_keys,
            text=self.text,
            shuffle_buffer=self.shuffle_buffer,
            flip=self.flip,
            pixels=is_pixel_set(self.manifest),
            image_size=self.image_size if self.images else None,
        )
        self._train_loader = ResumableLoader(
            stream, self.batches_per_epoch, self.num_workers, self._trainer_consumed
        )
        if state is not None:
            self._train_loader.load_state_dict(state)
            self._resume = None
        return self._train_loader

    # -- resume
    # -------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, int]:
        if self._train_loader is not None:
            return self._train_loader.state_dict()
        return dict(self._resume or {})

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        """Continue the training stream where ``state_dict`` left it (applied by
        `train_dataloader`)."""
        if self._train_loader is not None:
            self._train_loader.load_state_dict(state_dict)
        else:
            self._resume = dict(state_dict)


def open_manifest(
    root: str | None, urls: str | list[str] | None, manifest_url: str | None
) -> tuple[dict[str, Any], list[str]]:
    """Read a shard set's manifest and list its shards: from a folder (``root``), or from shard
    URLs (a brace pattern or a list) + a manifest path/URL (default: beside the first shard)."""
    if root is not None:
        root = os.path.abspath(os.path.expanduser(root))
        if not os.path.isdir(root):
            raise FileNotFoundError(f"data.root={root} does not exist. {_HOW_TO_MAKE}")
        where = os.path.join(root, MANIFEST)
        if not os.path.isfile(where):
            raise FileNotFoundError(
                f"{where} is missing: data.root must hold a latent shard set. {_HOW_TO_MAKE}"
            )
        with open(where) as f:
            manifest = parse_manifest(f.read(), where)
        return manifest, [os.path.join(root, shard["name"]) for shard in manifest["shards"]]
    shard_urls = wds.shardlists.expand_urls(urls) if isinstance(urls, str) else list(urls or [])
    if not shard_urls:
        raise ValueError(f"data.urls={urls!r} names no shards")
    where = manifest_url or os.path.join(os.path.dirname(shard_urls[0]), MANIFEST)
    check_reachable(where, "data.manifest")  # a server down at start: an error naming it
    try:
        with open_shard(where) as f:
            text = f.read().decode()
    except Exception as err:
        raise FileNotFoundError(
            f"Cannot read the manifest {where} ({err}); set data.manifest=<path or URL>"
        ) from err
    check_reachable(shard_urls[0])
    return parse_manifest(text, where), shard_urls


_HOW_TO_MAKE = (
    "Make one with: python -m data_pipelines.extract_latents source.root=<images> out=<folder>"
)
