"""FID reference statistics:

    python -m data_pipelines.fid_reference source=... image_size=... out=FILE.npz

Sources (conf/fid_reference/source/):
  imagefolder  source.root=DIR    ImageNet layout, ADM center crop to image_size (as extract_latents)
  shards       source.root=DIR    latent shards, posterior means decoded with the manifest's VAE
  digits                          the built-in set (quickstart data), upscaled to image_size
  adm          source.path=FILE   an ADM reference batch (e.g. VIRTUAL_imagenet256_labeled.npz):
                                  its mu/sigma as they are
The output holds mu, sigma and what they were made from (image size, Inception weights), so
evaluate.py refuses a reference that does not fit its samples. fd_encoders=[dinov2] adds the
statistics of that vision encoder's class-token features (evaluate.py metrics=[fid,fd_dinov2]),
fd_pretrained.<encoder>=DIR its local weights.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset, IterableDataset

from ditkit.data.datamodule import default_num_workers
from ditkit.data.format import (
    MANIFEST,
    MOMENTS,
    decode_moments,
    decode_pixel_moments,
    is_pixel_set,
    moments_shape,
    parse_manifest,
)
from ditkit.data.images import BadImage, center_crop_arr
from ditkit.data.sources import DigitsSource, ImageFolderSource
from ditkit.data.vae import vae_from_manifest
from ditkit.evaluation import load_inception, read_adm_reference, save_reference, to_uint8
from ditkit.evaluation.encoder_fd import EncoderStats, fd_encoder
from ditkit.evaluation.reference import compute_reference


class _SourceBatches(Dataset):
    """One item per job of a ditkit.data source: its images center-cropped, (n, 3, S, S) uint8 (bad
    files skipped)."""

    def __init__(self, source: Any, image_size: int, batch_size: int):
        self.source, self.image_size = source, image_size
        self.jobs = source.plan(batch_size)

    def __len__(self) -> int:
        return len(self.jobs)

    def __getitem__(self, i: int) -> torch.Tensor:
        crops = [
            center_crop_arr(img, self.image_size)
            for _, _, img in self.source.read(self.jobs[i])
            if not isinstance(img, BadImage)
        ]
        if not crops:
            return torch.zeros(0, 3, self.image_size, self.image_size, dtype=torch.uint8)
        return torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).contiguous()


class _ShardMeans(IterableDataset):
    """Posterior means (n, C, h, w) float32 of every sample of a latent shard set, shard by shard,
    batched."""

    def __init__(self, root: str, manifest: dict, batch_size: int):
        self.root, self.manifest, self.batch_size = root, manifest, batch_size

    def __iter__(self) -> Iterator[torch.Tensor]:
        import webdataset as wds

        shards = self.manifest["shards"]
        info = torch.utils.data.get_worker_info()
        if info is not None:
            shards = shards[info.id :: info.num_workers]
        shape, c = moments_shape(self.manifest), self.manifest["latent_shape"][0]
        batch = []
        for shard in shards:
            name = shard["name"] if isinstance(shard, dict) else shard
            for sample in wds.tarfile_to_samples()([{"url": os.path.join(self.root, name)}]):
                if is_pixel_set(self.manifest):
                    moments = decode_pixel_moments(sample, shape)
                else:
                    moments = decode_moments(sample, MOMENTS, shape)
                batch.append(torch.from_numpy(moments[:c].astype(np.float32)))
                if len(batch) == self.batch_size:
                    yield torch.stack(batch)
                    batch = []
        if batch:
            yield torch.stack(batch)


def _shard_images(
    cfg: DictConfig, device: torch.device
) -> tuple[Iterator[torch.Tensor], int, int, str]:
    """Decoded images of a shard set, its sample count, its image size and a description."""
    root = os.path.abspath(os.path.expanduser(cfg.source.root))
    path = os.path.join(root, MANIFEST)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"source.root={cfg.source.root}: no {MANIFEST} (a folder written by "
            "data_pipelines.extract_latents)"
        )
    with open(path) as f:
        manifest = parse_manifest(f.read(), path)
    if cfg.image_size is not None and manifest["image_size"] != cfg.image_size:
        raise ValueError(
            f"source.root={cfg.source.root} holds {manifest['image_size']} px images; pass "
            f"image_size={manifest['image_size']}"
        )
    vae = vae_from_manifest(manifest, cfg.source.vae, override="source.vae=DIR").to(device)
    loader = DataLoader(
        _ShardMeans(root, manifest, cfg.batch_size),
        batch_size=None,
        num_workers=default_num_workers(cfg.num_workers),
    )

    def decode() -> Iterator[torch.Tensor]:
        for means in loader:
            # Shards store unscaled moments, which is what the VAE decodes (ditkit.data.vae).
            yield to_uint8(vae.decode(means.to(device)).float())

    return decode(), int(manifest["num_samples"]), int(manifest["image_size"]), f"shards:{root}"


def _fd_encoders(cfg: DictConfig) -> dict[str, EncoderStats]:
    """{registry name: EncoderStats} for fd_encoders=[...] (fd_pretrained.<name>= local weights)."""
    from ditkit.models.encoders import FrozenEncoder

    local = dict(cfg.get("fd_pretrained") or {})
    names = [fd_encoder(n) for n in cfg.get("fd_encoders") or []]
    return {n: EncoderStats(FrozenEncoder(n, pretrained=local.get(n))) for n in names}


def build_reference(cfg: DictConfig) -> None:
    """Compute (or, for an ADM batch, convert) the reference and write it to cfg.out."""
    kind = cfg.source.name
    if kind == "adm":
        if not os.path.isfile(cfg.source.path):
            raise FileNotFoundError(
                f"source.path={cfg.source.path}: no such file (an ADM reference batch .npz)"
            )
        ref = read_adm_reference(cfg.source.path, cfg.image_size)
        if cfg.features:
            raise ValueError(
                "features= is for sources of images; an ADM batch's statistics are taken as they are"
            )
    else:
        device = torch.device(
            cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        )
        extractor = load_inception(cfg.fid.inception_weights, device)
        image_size = cfg.image_size
        if kind in ("imagefolder", "digits"):
            source = ImageFolderSource(cfg.source.root) if kind == "imagefolder" else DigitsSource()
            data = _SourceBatches(source, cfg.image_size, cfg.batch_size)
            batches = DataLoader(
                data, batch_size=None, num_workers=default_num_workers(cfg.num_workers)
            )
            total = sum(source.size(job) for job in data.jobs)
            name = f"{kind}:{getattr(source, 'root', 'sklearn digits')}"
        elif kind == "shards":
            batches, total, image_size, name = _shard_images(cfg, device)
        else:
            raise ValueError(f"source={kind}: choose imagefolder, shards, digits or adm")
        ref = compute_reference(
            batches,
            extractor,
            image_size=image_size,
            source=name,
            total=total,
            features=cfg.features,
            seed=cfg.seed,
            encoders=_fd_encoders(cfg),
        )
    save_reference(cfg.out, ref)
    print(
        json.dumps(
            {
                "out": os.path.abspath(cfg.out),
                "num_images": ref.num_images,
                "image_size": ref.image_size,
                "source": ref.source,
                "fd_encoders": sorted(ref.encoders),
            }
        )
    )


@hydra.main(config_path="../conf/fid_reference", config_name="fid_reference", version_base="1.3")
def main(cfg: DictConfig) -> None:
    build_reference(cfg)


if __name__ == "__main__":
    main()
