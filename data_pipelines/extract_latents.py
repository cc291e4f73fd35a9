"""Images -> VAE latents -> WebDataset shards: `python -m data_pipelines.extract_latents
source.root=DIR out=DIR`.

Overrides (conf/extract_latents.yaml): ``source=imagefolder|wds|digits``, ``vae.pretrained=<hub id
or folder>`` or ``vae=identity``, ``image_size=``, ``shard_size=``, ``batch_size=``, ``precision=``,
``num_workers=``, ``keep_images=true`` (also store the crop the VAE saw, as PNG: frozen vision
encoders read it for representation alignment, ``encoder=`` / ``alignment=``). Under torchrun
each rank writes its own shards and rank 0 writes the manifest; with ``rank=i world_size=n``
(separate machines, one shared folder) the last rank to finish writes it. Complete shards are
never rewritten, so rerunning the same command finishes an interrupted job.
"""

from __future__ import annotations

import json
import os

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from ditkit.data.datamodule import default_num_workers
from ditkit.data.extract import extract_latents, merge_manifest
from ditkit.data.vae import load_vae


def _placement(cfg: DictConfig) -> tuple[int, int, str]:
    """(rank, world_size, device) from the config, else from torchrun's environment."""
    rank = cfg.rank if cfg.rank is not None else int(os.environ.get("RANK", 0))
    world_size = (
        cfg.world_size if cfg.world_size is not None else int(os.environ.get("WORLD_SIZE", 1))
    )
    device = cfg.device
    if device == "auto":
        device = (
            f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
        )
    return rank, world_size, device


def run(cfg: DictConfig) -> dict:
    """Write this process's shards, merge the manifest when all are there; return a summary."""
    rank, world_size, device = _placement(cfg)
    torchrun = "TORCHELASTIC_RUN_ID" in os.environ and world_size > 1 and cfg.world_size is None
    if torchrun:  # only to agree on who writes the manifest: a CPU barrier is enough
        torch.distributed.init_process_group("gloo")
    source = instantiate(cfg.source)
    vae = load_vae(cfg.vae.pretrained, subfolder=cfg.vae.subfolder)
    out = os.path.abspath(os.path.expanduser(cfg.out))
    counts = extract_latents(
        source,
        vae,
        out,
        image_size=cfg.image_size,
        shard_size=cfg.shard_size,
        batch_size=cfg.batch_size,
        precision=cfg.precision,
        num_workers=default_num_workers(cfg.num_workers),
        rank=rank,
        world_size=world_size,
        device=device,
        progress=cfg.progress,
        keep_images=cfg.keep_images,
    )
    if torchrun:
        torch.distributed.barrier()
    manifest = merge_manifest(out) if rank == 0 or not torchrun else None
    summary = {"rank": rank, "world_size": world_size, **counts, "out": out}
    if manifest is not None:
        summary.update(
            manifest=os.path.join(out, "manifest.json"),
            num_samples=manifest["num_samples"],
            num_skipped=manifest["num_skipped"],
        )
    elif not torchrun:
        summary["manifest"] = "pending: other ranks still writing (the last to finish writes it)"
    if torchrun:
        torch.distributed.destroy_process_group()
    return summary


@hydra.main(config_path="../conf", config_name="extract_latents", version_base="1.3")
def main(cfg: DictConfig) -> None:
    print(json.dumps(run(cfg)))


if __name__ == "__main__":
    main()
