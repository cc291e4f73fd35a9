"""FID during training and evaluate.py on the checkpoint that training wrote.

One tiny train.py run (pixel-space 3x8x8 synthetic shards, identity VAE, 2 steps) with the FID callback
every 2 steps; the reference is made from the same shards (fid_reference source=shards). The callback's
FID at step 2 must equal evaluate.py's FID of the EMA weights in last.ckpt with the same sampling settings.
"""

import csv
import json

import pytest

from ditkit.evaluation import load_reference

SAMPLING = {"num_samples": 8, "batch_size": 4, "sampler": "ddim", "steps": 2}


@pytest.fixture(scope="module")
def trained(
    tmp_path_factory,
    inception_weights,
    write_synthetic_shards,
    make_reference,
    tiny_model,
    run_overrides,
    run_train,
):
    root = tmp_path_factory.mktemp("training")
    shards = write_synthetic_shards(
        root / "shards", num_samples=8, shape=(3, 8, 8), num_classes=10, num_shards=2
    )
    ref = make_reference(
        shards, root / "ref8.npz", inception_weights, 8, "batch_size=8", source="shards"
    )
    data = [
        f"data.root={shards}",
        "data=imagenet_latents",
        "data.latent_size=8",
        "data.latent_channels=3",
        "data.num_classes=10",
        "data.image_size=8",
        "data.batch_size=4",
        "data.num_workers=0",
        "data.shuffle_buffer=8",
    ]
    fid = [
        "+callbacks@callbacks.fid=fid",
        f"callbacks.fid.reference={ref}",
        f"callbacks.fid.inception_weights={inception_weights}",
        "callbacks.fid.every_n_steps=2",
        f"callbacks.fid.num_samples={SAMPLING['num_samples']}",
        f"callbacks.fid.batch_size={SAMPLING['batch_size']}",
        f"callbacks.fid.sampler.name={SAMPLING['sampler']}",
        f"callbacks.fid.sampler.steps={SAMPLING['steps']}",
        "callbacks.fid.grid_images=4",
    ]
    run_train(
        *tiny_model,
        *data,
        *run_overrides(root / "out", steps=2, every=2),
        *fid,
        "module.ema_decay=0.5",
    )
    (run_dir,) = [p.parent.parent for p in (root / "out").glob("*/checkpoints/last.ckpt")]
    return {"run": run_dir, "ref": ref, "shards": shards, "weights": inception_weights}


@pytest.mark.slow
def test_reference_from_latent_shards(trained):
    ref = load_reference(trained["ref"])
    assert (ref.image_size, ref.num_images) == (8, 8) and ref.source.startswith("shards:")


@pytest.mark.slow
def test_fid_callback_logs_and_equals_evaluate_on_the_checkpoint(trained, tmp_path, run_evaluate):
    logged = json.loads((trained["run"] / "fid" / "step_0000002.json").read_text())
    assert (
        logged["num_samples"] == 8
        and logged["fid"] > 0
        and (trained["run"] / "fid" / "step_0000002.png").is_file()
    )
    (metrics_csv,) = trained["run"].rglob("metrics.csv")
    rows = [r for r in csv.DictReader(metrics_csv.open()) if r.get("val/fid")]
    assert float(rows[-1]["val/fid"]) == pytest.approx(logged["fid"], rel=1e-6)
    assert float(rows[-1]["val/is"]) == pytest.approx(logged["is"], rel=1e-6)

    out = tmp_path / "eval"
    # Run folders are named by their overrides ("=" and ","): Hydra needs the path quoted.
    run_evaluate(
        f"ckpt='{trained['run'] / 'checkpoints' / 'last.ckpt'}'",
        f"fid.reference={trained['ref']}",
        f"fid.inception_weights={trained['weights']}",
        f"num_samples={SAMPLING['num_samples']}",
        f"batch_size={SAMPLING['batch_size']}",
        f"sampler={SAMPLING['sampler']}",
        f"sampler.steps={SAMPLING['steps']}",
        "accelerator=cpu",
        "progress=false",
        "wandb.enabled=false",
        f"hydra.run.dir={out}",
    )
    metrics = json.loads((out / "metrics.json").read_text())
    # Same EMA weights, labels, noise and sampler draws: the same images, so the same FID.
    assert metrics["fid"] == pytest.approx(logged["fid"], rel=1e-6)
    assert metrics["is"] == pytest.approx(logged["is"], rel=1e-6)
    assert metrics["settings"]["vae"] == "identity" and metrics["settings"]["image_size"] == 8
