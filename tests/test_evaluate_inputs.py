"""What evaluate.py accepts: checkpoint kinds, sampler and guidance settings; and what it refuses
before any sampling, with a message that says what to fix.

These run evaluate() / build() in process on configs composed from conf/evaluate.yaml; every error case
fails before Lightning starts or Inception loads.
"""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from ditkit.checkpoints import read_checkpoint
from ditkit.evaluation import Reference, save_reference

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "fixtures" / "dit_reference_tiny.pt"

spec = importlib.util.spec_from_file_location("evaluate_entry", REPO / "evaluate.py")
evaluate_entry = importlib.util.module_from_spec(spec)
spec.loader.exec_module(evaluate_entry)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The tiny reference DiT as official-layout weights (8x8x4 latents; with vae=identity it samples
    8 px), and references (statistics only, no Inception needed) made at 8 px and at 32 px."""
    root = tmp_path_factory.mktemp("errors")
    torch.save(torch.load(FIXTURE, weights_only=True)["state_dict"], root / "DiT-tiny.pt")
    ref = Reference(
        np.zeros(2048), np.eye(2048), image_size=32, num_images=10, fingerprint="x", source="test"
    )
    save_reference(root / "ref32.npz", ref)
    save_reference(root / "ref8.npz", Reference(**{**ref.__dict__, "image_size": 8}))
    return root


def run(root, *overrides):
    base = [
        f"ckpt={root / 'DiT-tiny.pt'}",
        "num_heads=4",
        "vae=identity",
        f"fid.reference={root / 'ref8.npz'}",
        "accelerator=cpu",
    ]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="evaluate", overrides=[*base, *overrides])
    return evaluate_entry.evaluate(cfg, root / "run")


def test_missing_reference_file(files):
    with pytest.raises(FileNotFoundError, match="no such file.*data_pipelines.fid_reference"):
        run(files, f"fid.reference={files / 'nope.npz'}")


def test_reference_made_at_another_image_size(files):
    # identity VAE: the model samples 8 px "images"; the reference was made from 32 px images.
    with pytest.raises(
        ValueError, match="made from 32 px images but the samples are 8 px.*image_size=8"
    ):
        run(files, f"fid.reference={files / 'ref32.npz'}")


def test_fid_without_a_reference_and_kid_without_reference_features(files):
    with pytest.raises(ValueError, match="need fid.reference"):
        run(files, "fid.reference=null")
    with pytest.raises(ValueError, match="features=10000"):
        run(files, "metrics=[fid,kid]")
    with pytest.raises(ValueError, match="unknown"):
        run(files, "metrics=[fid,sfid]")


def test_checkpoints_of_the_wrong_kind(files, tmp_path):
    lightning_ckpt = tmp_path / "other.ckpt"
    torch.save({"state_dict": {"layer.weight": torch.zeros(2)}, "epoch": 3}, lightning_ckpt)
    with pytest.raises(
        ValueError, match="without `ditkit_config`: not written by ditkit's train.py"
    ):
        run(files, f"ckpt={lightning_ckpt}")
    vae_weights = tmp_path / "vae.pt"
    torch.save({"encoder.conv_in.weight": torch.zeros(8, 3, 3, 3)}, vae_weights)
    with pytest.raises(ValueError, match="not a DiT checkpoint in the official layout"):
        run(files, f"ckpt={vae_weights}")
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="weights_only=True"):
        run(files, f"ckpt={text}")
    with pytest.raises(FileNotFoundError, match="no such file"):
        run(files, f"ckpt={tmp_path / 'missing.ckpt'}")
    with pytest.raises(ValueError, match="is a folder"):
        run(files, f"ckpt={tmp_path}")
    with pytest.raises(ValueError, match="holds only EMA weights"):
        run(files, "weights=raw")


def test_sampler_of_the_other_objective(files):
    with pytest.raises(ValueError, match="euler"):
        run(files, "sampler=euler")


def test_ditkit_checkpoint_gives_ema_or_raw_weights(tmp_path):
    ema, raw = torch.randn(3), torch.randn(3)
    path = tmp_path / "last.ckpt"
    torch.save(
        {
            "state_dict": {"ema.w": ema, "model.w": raw, "ema_updates": torch.tensor(5)},
            "ditkit_config": {"model": {}},
        },
        path,
    )
    assert torch.equal(read_checkpoint(path).state_dict["w"], ema)
    assert torch.equal(read_checkpoint(path, "raw").state_dict["w"], raw)
    assert read_checkpoint(path).kind == "ditkit" and read_checkpoint(path).run_config == {
        "model": {}
    }
    with pytest.raises(ValueError, match="choose ema or raw"):
        read_checkpoint(path, "best")


def _compose(*overrides):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="evaluate", overrides=list(overrides))


def test_safetensors_weights_build_the_model_and_settings_follow_the_config(tmp_path):
    from ditkit.checkpoints import export_weights
    from ditkit.models import DiT

    model = DiT(
        input_size=8,
        patch_size=2,
        in_channels=3,
        hidden_size=32,
        depth=2,
        num_heads=2,
        num_classes=10,
    )
    export_weights(model.state_dict(), tmp_path / "ema.safetensors")
    cfg = _compose(
        f"ckpt={tmp_path / 'ema.safetensors'}",
        "num_heads=2",
        "vae=identity",
        "cfg_scale=4.0",
        "guidance_channels=3",
        "guidance_interval=[0,700]",
        "sampler=ddim",
        "sampler.steps=10",
    )
    built, objective, vae, _ = evaluate_entry.build(cfg, read_checkpoint(cfg.ckpt))
    for key, value in model.state_dict().items():
        assert torch.equal(built.state_dict()[key], value), key
    assert (objective.name, objective.learn_sigma, vae.name, vae.downsample) == (
        "ddpm",
        True,
        "identity",
        1,
    )
    assert evaluate_entry.sampler_settings(cfg, objective) == {
        "sampler": "ddim",
        "steps": 10,
        "eta": 0.0,  # the sampler's registered options, with their defaults
        "clip_denoised": False,
        "cfg_scale": 4.0,
        "guidance_channels": 3,
        "guidance_interval": [0.0, 700.0],
    }
    # A flow model's weights: objective=flow, and the default sampler follows the objective (SiT's
    # SDE, 250 steps).
    cfg = _compose(
        f"ckpt={tmp_path / 'ema.safetensors'}", "num_heads=2", "vae=identity", "objective=flow"
    )
    _, objective, _, _ = evaluate_entry.build(cfg, read_checkpoint(cfg.ckpt))
    settings = evaluate_entry.sampler_settings(cfg, objective)
    assert (objective.name, settings["sampler"], settings["steps"]) == ("flow", "sde", 250)
    with pytest.raises(ValueError, match="drop weights=raw"):
        read_checkpoint(cfg.ckpt, "raw")


def test_a_bad_checkpoint_is_named_before_a_missing_reference(files, tmp_path):
    """Issue 14 item 8: the checkpoint is checked first, even when fid.reference is wrong too."""
    missing = tmp_path / "missing.ckpt"
    with pytest.raises(FileNotFoundError, match=f"ckpt=.*{missing.name}: no such file"):
        run(files, f"ckpt={missing}", f"fid.reference={tmp_path / 'nope.npz'}")
    with pytest.raises(FileNotFoundError, match=f"ckpt=.*{missing.name}: no such file"):
        run(files, f"ckpt={missing}", "fid.reference=null")
    unreadable = tmp_path / "notes.pt"
    unreadable.write_text("not a checkpoint")
    with pytest.raises(ValueError, match=f"{unreadable.name}.*weights_only=True"):
        run(files, f"ckpt={unreadable}", "fid.reference=null")
