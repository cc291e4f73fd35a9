"""A 2-job sweep (`train.py -m`) in one process with the W&B logger offline: each job trains in its own
folder, gets its own W&B run (wandb.finish between jobs) with the run name and composed config, and the
offline run files read back hold one train/loss per step."""

import json
from pathlib import Path

import pytest
import torch
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf
from PIL import Image
from wandb.proto import wandb_internal_pb2

pytestmark = pytest.mark.slow
STEPS = 3


def wandb_records(path: Path):
    """Protobuf records of an offline W&B run file: a 7-byte header, then a LevelDB-style log of
    32 KiB blocks whose records are (crc32: 4, length: 2, type: 1, data), type 1 = whole,
    2/3/4 = first/middle/last."""
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    pos, block, parts = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        payload, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(parts + payload if kind == 4 else payload)
            parts = b""
            yield record
        elif kind in (2, 3):
            parts += payload


def read_offline_run(run_dir: Path) -> dict:
    (path,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    run, config, losses = None, {}, {}
    for record in wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
        elif kind == "config":
            config.update({item.key: json.loads(item.value_json) for item in record.config.update})
        elif kind == "history":
            # "a/b" keys arrive as key "a/b" or as nested_key ["a", "b"]
            items = {
                item.key or "/".join(item.nested_key): json.loads(item.value_json)
                for item in record.history.item
            }
            if "train/loss" in items:
                losses[items["trainer/global_step"]] = items["train/loss"]
    return {
        "id": run.run_id,
        "name": run.display_name,
        "project": run.project,
        "config": config,
        "losses": losses,
    }


def test_two_job_sweep_with_offline_wandb(
    tmp_path, tiny_model, write_synthetic_shards, data_overrides, run_overrides, run_train
):
    shards = write_synthetic_shards(tmp_path / "shards")
    out = tmp_path / "runs"
    overrides = [
        o for o in run_overrides(out, STEPS, 2) if o not in ("logger=csv", "~callbacks.sample_grid")
    ]
    grid = [
        f"callbacks.sample_grid.every_n_steps={STEPS}",
        "callbacks.sample_grid.num_images=4",
        "callbacks.sample_grid.sampler.steps=2",
    ]
    proc = run_train(
        "-m",
        *tiny_model,
        *data_overrides(shards),
        *overrides,
        *grid,
        "logger=wandb",
        "objective=ddpm,flow",
        "model.learn_sigma=false",
        timeout=300,
    )
    assert (
        "#0 : " in proc.stdout + proc.stderr and "#1 : " in proc.stdout + proc.stderr
    )  # Hydra's job list

    runs = {}
    for config_file in out.glob("*/.hydra/config.yaml"):
        cfg = OmegaConf.load(config_file)
        runs[cfg.objective._target_.rsplit(".", 1)[1]] = (config_file.parent.parent, cfg)
    assert sorted(runs) == ["GaussianDiffusion", "RectifiedFlow"]  # one folder per job
    assert len({run_dir.name for run_dir, _ in runs.values()}) == 2
    for (
        run_dir,
        _,
    ) in runs.values():  # `evaluate.py ckpt=<run>/checkpoints/last.ckpt` needs no quotes
        # What the run is first, the long rest as a hash (ditkit.training.identity.run_name).
        assert run_dir.name.startswith("model-dit_s+objective-") and "+rest-" in run_dir.name
        assert not {"=", ","} & set(run_dir.name)
        ckpt = f"{run_dir}/checkpoints/last.ckpt"
        assert OverridesParser.create().parse_override(f"ckpt={ckpt}").value() == ckpt

    ids = set()
    for target, (run_dir, _cfg) in runs.items():
        ckpt = torch.load(run_dir / "checkpoints/last.ckpt", weights_only=True)
        assert ckpt["global_step"] == STEPS
        assert ckpt["ditkit_config"]["objective"]["_target_"].endswith(target)  # for evaluate.py
        wb = read_offline_run(run_dir)
        ids.add(wb["id"])
        assert wb["id"] == (run_dir / "wandb_id").read_text()  # a rerun continues this W&B run
        assert wb["name"] == run_dir.name and wb["project"] == "ditkit"
        assert wb["config"]["objective"]["_target_"].endswith(
            target
        )  # the composed config, resolved
        assert wb["config"]["model"]["depth"] == 2 and wb["config"]["run_name"] == run_dir.name
        assert sorted(wb["losses"]) == list(range(STEPS))  # this job's steps only, each once
        assert all(0 < loss < 10 for loss in wb["losses"].values())
        # The sample grid of the EMA model: 4 images of 8x8 in a 2x2 grid, as a PNG and as a W&B image.
        (png,) = (run_dir / "samples").glob("*.png")
        # 2 x 2 cells of 8 px and a 2 px gutter (training.samples.GUTTER)
        assert png.name == f"step_{STEPS:07d}.png" and Image.open(png).size == (18, 18)
        assert len(list(run_dir.glob("wandb/offline-run-*/files/media/images/samples_*.png"))) == 1
    assert len(ids) == 2
