"""evaluate.py end to end on official-layout weights (the tiny reference DiT + a tiny VAE): numbers
equal to torch-fidelity's on the written samples.npz, 2 processes equal 1, resume from finished
parts."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch_fidelity

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "fixtures" / "dit_reference_tiny.pt"
N = 8  # samples per run: Inception at 299 px is the slow part on CPU


@pytest.fixture(scope="module")
def official(
    tmp_path_factory,
    inception_weights,
    blob_images,
    write_image_folder,
    make_reference,
    run_evaluate,
):
    """The tiny reference DiT as a bare official-layout .pt, a tiny AutoencoderKL (8x8x4 latents ->
    64 px), a 64 px reference made from a folder of PNGs, and one finished 1-process evaluate.py
    run."""
    from diffusers import AutoencoderKL

    root = tmp_path_factory.mktemp("official")
    torch.save(torch.load(FIXTURE, weights_only=True)["state_dict"], root / "DiT-tiny.pt")
    torch.manual_seed(0)
    AutoencoderKL(
        block_out_channels=[8, 16, 16, 16],
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        latent_channels=4,
        norm_num_groups=4,
        layers_per_block=1,
    ).save_pretrained(root / "vae")
    files = {
        "ckpt": root / "DiT-tiny.pt",
        "vae": root / "vae",
        "real": root / "real",
        "weights": inception_weights,
    }
    write_image_folder(files["real"], blob_images(N, 64, seed=0), classes=1)
    files["ref"] = make_reference(
        files["real"], root / "ref64.npz", inception_weights, 64, f"features={N}"
    )
    files["run"] = root / "run1"
    run_evaluate(*official_overrides(files, files["run"]))
    return files


def official_overrides(
    files, out: Path, *extra: str, metrics: str = "[fid,is,kid,prc]"
) -> list[str]:
    return [
        f"ckpt={files['ckpt']}",
        "num_heads=4",
        "vae=sd_ft_ema",
        f"vae.pretrained={files['vae']}",
        f"fid.reference={files['ref']}",
        f"fid.inception_weights={files['weights']}",
        f"num_samples={N}",
        "batch_size=2",
        "sampler=ddim",
        "sampler.steps=4",
        "cfg_scale=1.5",
        "accelerator=cpu",
        "progress=false",
        f"metrics={metrics}",
        f"hydra.run.dir={out}",
        *extra,
    ]


def read_run(out: Path):
    with np.load(out / "samples.npz") as z:
        return json.loads((out / "metrics.json").read_text()), z["arr_0"], z["arr_1"]


@pytest.mark.slow
def test_official_layout_end_to_end_equals_torch_fidelity_on_samples_npz(
    official, tmp_path, write_image_folder
):
    metrics, images, labels = read_run(official["run"])
    assert images.dtype == np.uint8 and images.shape == (N, 64, 64, 3)
    assert sorted(labels.tolist()) == list(
        range(N)
    )  # 8 samples over 10 classes: balanced, no repeats
    assert metrics["num_samples"] == N
    assert (
        metrics["settings"]["image_size"],
        metrics["settings"]["sampler"],
        metrics["settings"]["steps"],
    ) == (64, "ddim", 4)
    assert (official["run"] / "samples.png").is_file() and not (official["run"] / "parts").exists()
    assert list(
        (official["run"] / "wandb").glob("offline-run-*")
    )  # logged to W&B (offline in tests)
    # The same numbers from the written samples.npz, by torch-fidelity itself (same stand-in weights).
    write_image_folder(tmp_path / "npz", images, classes=1)
    theirs = torch_fidelity.calculate_metrics(
        input1=str(tmp_path / "npz"),
        input2=str(official["real"]),
        samples_find_deep=True,
        cuda=False,
        cache=False,
        verbose=False,
        save_cpu_ram=True,
        fid=True,
        isc=True,
        isc_splits=N // 2,
        kid=True,
        kid_subset_size=N,
        prc=True,
        feature_extractor="inception-v3-compat",
        feature_extractor_weights_path=str(official["weights"]),
    )
    assert (
        metrics["fid"] > 0.1 and metrics["is"] > 1.001
    )  # non-trivial values (noise-like samples score low)
    assert metrics["fid"] == pytest.approx(theirs["frechet_inception_distance"], rel=1e-5)
    assert metrics["is"] == pytest.approx(theirs["inception_score_mean"], rel=1e-5)
    assert metrics["kid"] == pytest.approx(
        theirs["kernel_inception_distance_mean"], rel=1e-4, abs=1e-9
    )
    assert (metrics["precision"], metrics["recall"]) == (theirs["precision"], theirs["recall"])


@pytest.mark.slow
def test_two_gloo_processes_give_the_samples_and_fid_of_one(official, tmp_path, run_evaluate):
    run_evaluate(
        *official_overrides(official, tmp_path / "run2", "devices=2", "wandb.enabled=false")
    )
    one, two = read_run(official["run"]), read_run(tmp_path / "run2")
    np.testing.assert_array_equal(one[1], two[1])  # the very same images, in the same order
    np.testing.assert_array_equal(one[2], two[2])
    # Statistics merged over the ranks: equal up to float64 summation order, which the square roots
    # of the ~0 eigenvalues of a rank-7 covariance (8 samples, 2048 dimensions) magnify to ~1e-9.
    assert two[0]["fid"] == pytest.approx(one[0]["fid"], rel=1e-6)
    assert two[0]["is"] == pytest.approx(one[0]["is"], rel=1e-9)
    assert two[0]["kid"] == pytest.approx(one[0]["kid"], rel=1e-9)
    assert (two[0]["precision"], two[0]["recall"]) == (one[0]["precision"], one[0]["recall"])


@pytest.mark.slow
def test_rerun_resumes_from_the_parts_an_interrupted_run_left(official, tmp_path, run_evaluate):
    """A part on disk is read back, not sampled again; the missing batches are sampled as in an
    uninterrupted run."""
    out = tmp_path / "run"
    (out / "parts").mkdir(parents=True)
    fake = {
        "images": np.zeros((2, 64, 64, 3), np.uint8),
        "labels": np.array([3, 9]),
        "pool": np.zeros((2, 2048), np.float32),
        "logits": np.zeros((2, 1008), np.float32),
    }
    np.savez(
        out / "parts" / "part-000000002.npz", **fake
    )  # the batch of samples 2..3, "finished before the kill"
    proc = run_evaluate(*official_overrides(official, out, "wandb.enabled=false", metrics="[is]"))
    # It says it resumes, and where its results went.
    assert f"resuming the interrupted evaluation in {out}: 2 of {N} samples are done" in proc.stdout
    assert f"metrics in {out / 'metrics.json'}, samples in {out / 'samples.npz'}" in proc.stdout
    metrics, images, labels = read_run(out)
    _, full_images, full_labels = read_run(official["run"])
    np.testing.assert_array_equal(images[2:4], 0)
    assert labels[2:4].tolist() == [3, 9]
    keep = [0, 1, 4, 5, 6, 7]
    np.testing.assert_array_equal(images[keep], full_images[keep])
    np.testing.assert_array_equal(labels[keep], full_labels[keep])
    assert "fid" not in metrics and metrics["is"] != pytest.approx(
        read_run(official["run"])[0]["is"], rel=1e-6
    )
