"""The training stream of latent batches read from shards: endless, resampled, resumable. It skips
(and counts) damaged samples and shards instead of crashing.

Each time the training stream reads a sample it picks the image or its mirror at random and draws
``latent = scale * (mean + exp(logvar / 2) * eps)``, eps ~ N(0, I): the VAE posterior sample a model
trained on images would see (DiT trains with random flips on freshly encoded images).
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
from collections.abc import Iterator
from itertools import islice
from typing import Any

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from ditkit.data.format import (
    CONTEXT,
    IMAGE,
    MOMENTS,
    MOMENTS_FLIP,
    POOLED,
    DataFormatError,
    decode_image,
    decode_label,
    decode_moments,
    decode_pixel_moments,
)
from ditkit.data.remote import open_shard

log = logging.getLogger(__name__)


class SkipCounter:
    """Counts damaged samples / shards, and the samples read intact, across DataLoader worker
    processes (shared integers): ``count / (count + read)`` is the damaged share of the stream."""

    def __init__(self) -> None:
        self._value = multiprocessing.Value("q", 0)
        self._read = multiprocessing.Value("q", 0)

    def skip(self, what: str) -> None:
        with self._value.get_lock():
            self._value.value += 1
        log.warning("skipped damaged data: %s", what)

    def add_read(self, n: int) -> None:
        with self._read.get_lock():
            self._read.value += n

    @property
    def count(self) -> int:
        return int(self._value.value)

    @property
    def read(self) -> int:
        return int(self._read.value)


def draw_latents(moments: np.ndarray, scale: float, eps: np.ndarray) -> np.ndarray:
    """moments: (B, 2C, H, W) mean ‖ logvar, eps: (B, C, H, W) float32 ~ N(0, I), overwritten ->
    (B, C, H, W) float32 ``scale * (mean + exp(logvar / 2) * eps)``, a scaled sample of each
    posterior.

    NumPy, in place: single-threaded by design (a loader must not compete with training for cores;
    torch's intra-op threads on these small arrays are slower when the cores are busy)."""
    c = moments.shape[1] // 2
    x = moments.astype(np.float32)
    std = x[:, c:]
    np.multiply(std, 0.5, out=std)
    np.exp(std, out=std)
    eps *= std
    eps += x[:, :c]
    eps *= scale
    return eps


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


class TrainStream(IterableDataset):
    """Endless stream of batches for one rank, a deterministic function of (seed, epoch, rank,
    worker).

    Shards are drawn with replacement (`wds.ResampledShards`), so every rank and worker reads an
    independent random sequence of all shards, then a shuffle buffer mixes samples across shards.
    The DataLoader takes batches from its workers in turn (batch j from worker j % W). To continue
    an epoch at batch ``start_batch``, worker w plays the part of worker (w + start_batch) % W and
    drops the batches that part had already delivered, so the batches after a resume are exactly
    those of an uninterrupted run.

    urls: the shards; moments_shape: (2C, H, W) of the stored moments; scale: the VAE's scale
    factor; batch_size: per rank. pixels: the shards store uint8 pixels (identity VAE), read as
    moments with a log-variance of -inf (format.decode_pixel_moments). With ``text`` =
    (context_len, context_dim, pooled_dim) the condition of a sample is its text embeddings
    (captioned shards) instead of its label. With ``image_size`` set, batches also carry "image":
    the stored crop (B, 3, S, S) uint8, mirrored exactly when the mirror's moments were drawn.
    """

    def __init__(
        self,
        urls: list[str],
        moments_shape: tuple[int, int, int],
        scale: float,
        batch_size: int,
        seed: int,
        rank: int,
        world_size: int,
        counter: SkipCounter,
        return_keys: bool = False,
        text: tuple[int, int, int] | None = None,
        shuffle_buffer: int = 1000,
        flip: bool = True,
        pixels: bool = False,
        image_size: int | None = None,
    ) -> None:
        super().__init__()
        self.pixels = pixels
        self.image_size = image_size
        self.urls = list(urls)
        self.moments_shape = tuple(moments_shape)
        self.scale = float(scale)
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.counter = counter
        self.return_keys = return_keys
        self.text = text
        self.shuffle_buffer = shuffle_buffer
        self.flip = flip
        self.epoch = 0
        self.start_batch = 0

    def _damaged(self, exn: Exception) -> bool:
        """WebDataset handler: skip and count what cannot be read."""
        self.counter.skip(f"{type(exn).__name__}: {exn}")
        return True

    def _read(self, shards: Iterator[dict[str, str]]) -> Iterator[dict[str, Any]]:
        """{"url"} dicts -> raw samples (dicts of bytes). A shard that cannot be opened or is cut
        short counts once (WebDataset's own expander would report a cut twice) and yields what came
        before the cut."""
        return wds.tariterators.group_by_keys(self._members(shards), handler=self._damaged)

    def _members(self, shards: Iterator[dict[str, str]]) -> Iterator[dict[str, Any]]:
        for shard in shards:
            url, stream = shard["url"], None
            try:
                stream = open_shard(url)  # HTTP(S): reconnects mid-shard (data/remote.py)
                for member in wds.tariterators.tar_file_iterator(stream):
                    yield {**member, "__url__": url}
            except Exception as exn:  # noqa: BLE001 - any failure of one shard must not stop training
                self.counter.skip(f"{url}: {type(exn).__name__}: {exn}")
            finally:
                if stream is not None:
                    with contextlib.suppress(
                        Exception
                    ):  # a failed pipe: its cut-off output was counted above
                        stream.close()
            yield {}  # end of shard: the last sample is complete (group_by_keys' marker)

    def _decode(self, sample: dict[str, Any], field: str) -> tuple[dict, np.ndarray] | None:
        """-> (condition fields, moments): {"y": label}, or with ``text`` {"context": (L, D),
        "pooled": (P,)}; None (skipped and counted) when the sample is damaged."""
        try:
            if self.text is None:
                condition = {"y": decode_label(sample)}
            else:
                length, dim, pooled = self.text
                condition = {
                    "context": decode_moments(sample, CONTEXT, (length, dim)),
                    "pooled": decode_moments(sample, POOLED, (pooled,)),
                }
            if self.image_size is not None:
                image = decode_image(sample, self.image_size)
                # The mirror's moments go with the mirrored image (the same flip, both fields).
                condition[IMAGE] = image[..., ::-1] if field == MOMENTS_FLIP else image
            if self.pixels:
                mirror = field == MOMENTS_FLIP
                return condition, decode_pixel_moments(sample, self.moments_shape, mirror)
            return condition, decode_moments(sample, field, self.moments_shape)
        except DataFormatError as err:
            self.counter.skip(f"{sample.get('__url__')}#{sample.get('__key__')}: {err}")
            return None

    def _collate(self, samples: list[tuple[str, np.ndarray, dict]], eps: torch.Generator) -> dict:
        """(key, moments (2C, H, W), condition fields) samples -> the batch dict: "x" latents
        (B, C, H, W) float32 drawn with `eps`, "y" (B,) int64 or "context" (B, L, D) and "pooled"
        (B, P) float32, and "key" (B sample keys) with return_keys. Drawing per batch rather than
        per sample: one vectorised op."""
        keys, moments, fields = zip(*samples)
        self.counter.add_read(len(keys))  # once per batch, not per sample: one lock
        moments = np.stack(moments)
        c, h, w = moments.shape[1] // 2, moments.shape[2], moments.shape[3]
        noise = torch.randn((len(keys), c, h, w), generator=eps).numpy()
        batch = {"x": torch.from_numpy(draw_latents(moments, self.scale, noise))}
        for name in fields[0]:
            values = [f[name] for f in fields]
            if name == "y":
                batch[name] = torch.tensor(values, dtype=torch.long)
            elif name == IMAGE:
                batch["image"] = torch.from_numpy(np.stack(values))  # (B, 3, S, S) uint8
            else:
                batch[name] = torch.from_numpy(np.stack(values).astype(np.float32))
        if self.return_keys:
            batch["key"] = list(keys)
        return batch

    def __iter__(self) -> Iterator[dict]:
        worker, workers = _worker()
        part = (worker + self.start_batch) % workers
        done = len(
            range(part, self.start_batch, workers)
        )  # batches j < start_batch with j % W == part
        seeds = np.random.SeedSequence([self.seed, self.epoch, self.rank, part]).generate_state(4)
        flips = np.random.default_rng(int(seeds[2]))
        eps = torch.Generator().manual_seed(int(seeds[3]))
        pipeline = wds.DataPipeline(
            # worker_seed=0: the (rank, worker) part is already in the seed; WebDataset's own would
            # use the physical worker id, which a resume remaps.
            wds.ResampledShards(
                self.urls, seed=int(seeds[0]), worker_seed=lambda: 0, deterministic=True
            ),
            self._read,
            wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, seed=int(seeds[1])),
            lambda samples: self._pick(samples, flips),
            wds.batched(
                self.batch_size,
                collation_fn=lambda batch: self._collate(batch, eps),
                partial=False,
            ),
        )
        return islice(iter(pipeline), done, None)

    def _pick(
        self, samples: Iterator[dict[str, Any]], flips: np.random.Generator
    ) -> Iterator[tuple]:
        """Decode the image's or the mirror's moments (a fair coin per read; always the image
        without flip)."""
        for sample in samples:
            mirror = flips.random() < 0.5 and self.flip
            decoded = self._decode(sample, MOMENTS_FLIP if mirror else MOMENTS)
            if decoded is not None:
                fields, moments = decoded
                yield sample["__key__"], moments, fields
