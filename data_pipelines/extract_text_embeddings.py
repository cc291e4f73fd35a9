"""Captions -> text embeddings -> a captioned copy of a latent shard set:
`python -m data_pipelines.extract_text_embeddings shards=DIR out=DIR [captions.file=FILE.json]`.

Captions come from a JSON file {sample key: caption} (``captions.file=``) or from the class names
(``captions.template='a photo of a {}'``, ``captions.class_names=[...]``, default the manifest's
names). Encoders (``encoders=[...]``): Hugging Face CLIP text models and / or one T5 encoder, each a
hub id or a local folder (see conf/extract_text_embeddings.yaml). Each sample gains ``txt``,
``context.npy`` and ``pooled.npy`` (float16); the manifest records the encoders, which sampling
reuses to embed prompts. Rerunning the same command finishes an interrupted job (complete shards are
kept).
"""

from __future__ import annotations

import json
import os

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from ditkit.data.captions import add_text_embeddings, captioner
from ditkit.data.format import MANIFEST, parse_manifest
from ditkit.data.text import TextEncoders


def run(cfg: DictConfig) -> dict:
    """Caption and embed every sample of cfg.shards into cfg.out; return a summary."""
    where = os.path.join(os.path.expanduser(cfg.shards), MANIFEST)
    if not os.path.isfile(where):
        raise FileNotFoundError(
            f"{where} is missing: shards= must be a latent shard folder (data_pipelines.extract_latents)"
        )
    with open(where) as f:
        manifest = parse_manifest(f.read(), where)
    captions = OmegaConf.to_container(cfg.captions, resolve=True)
    caption, record = captioner(
        manifest, captions["file"], captions["template"], captions["class_names"]
    )
    device = (
        cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    )
    encoders = TextEncoders(
        OmegaConf.to_container(cfg.encoders, resolve=True), precision=cfg.precision
    ).to(device)
    out = add_text_embeddings(
        cfg.shards,
        cfg.out,
        encoders,
        caption,
        record,
        batch_size=cfg.batch_size,
        progress=cfg.progress,
    )
    text = out["text"]
    return {
        "out": os.path.abspath(os.path.expanduser(cfg.out)),
        "num_samples": out["num_samples"],
        "context_len": text["context_len"],
        "context_dim": text["context_dim"],
        "pooled_dim": text["pooled_dim"],
        "train_with": f"data.root={os.path.abspath(os.path.expanduser(cfg.out))} "
        "data.context_len={text['context_len']} "
        f"data.context_dim={text['context_dim']} data.pooled_dim={text['pooled_dim']}",
    }


@hydra.main(config_path="../conf", config_name="extract_text_embeddings", version_base="1.3")
def main(cfg: DictConfig) -> None:
    print(json.dumps(run(cfg)))


if __name__ == "__main__":
    main()
