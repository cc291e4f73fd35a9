"""`python -m ditkit.export ... format=diffusers`: a DiTPipeline built from an exported tiny run samples
what ditkit's DDPM sampler samples from the same noise and labels."""

import json
import subprocess
import sys

import pytest
import torch
from diffusers import AutoencoderKL, DDPMScheduler, DiTPipeline, FlowMatchEulerDiscreteScheduler
from tiny_diffusers import MMDIT, randomize

from ditkit.export import main, scheduler_config
from ditkit.models import DiT
from ditkit.objectives import GaussianDiffusion

MODEL = dict(
    _target_="ditkit.models.DiT",
    input_size=8,
    patch_size=2,
    in_channels=4,
    hidden_size=32,
    depth=2,
    num_heads=2,
    num_classes=1000,  # DiTPipeline's null class is 1000, hard-coded
    learn_sigma=False,
    timestep_freq_shift=1,
)
OBJECTIVE = dict(
    _target_="ditkit.objectives.GaussianDiffusion",
    num_timesteps=1000,
    schedule="linear",
    learn_sigma=False,
    prediction="eps",
    fixed_variance="large",
)


def write_run(tmp_path, write_synthetic_shards, model_cfg=MODEL, objective=OBJECTIVE):
    """A checkpoint in train.py's layout (ema.* / model.* weights, ditkit_config) whose data
    manifest names a tiny local AutoencoderKL with scale factor 0.5."""
    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=[8, 8],
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        latent_channels=4,
        norm_num_groups=4,
        layers_per_block=1,
    )
    vae.save_pretrained(tmp_path / "vae")
    shards = write_synthetic_shards(tmp_path / "shards", num_samples=4, num_shards=1)
    manifest = json.loads((shards / "manifest.json").read_text())
    manifest["vae"] = {"name": str(tmp_path / "vae"), "scale_factor": 0.5, "latent_channels": 4}
    (shards / "manifest.json").write_text(json.dumps(manifest))
    model = DiT(**{k: v for k, v in model_cfg.items() if k != "_target_"})
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    state = {f"ema.{k}": v for k, v in model.state_dict().items()}
    state.update({f"model.{k}": torch.zeros_like(v) for k, v in model.state_dict().items()})
    config = {"model": model_cfg, "objective": objective, "data": {"root": str(shards)}}
    torch.save({"state_dict": state, "ditkit_config": config}, tmp_path / "last.ckpt")
    return model.eval(), vae.eval()


def test_dit_pipeline_samples_what_ditkit_samples(tmp_path, write_synthetic_shards):
    model, vae = write_run(tmp_path, write_synthetic_shards)
    out = main([f"ckpt={tmp_path / 'last.ckpt'}", "format=diffusers", f"out={tmp_path / 'export'}"])
    pipe = DiTPipeline.from_pretrained(out).to(torch.float64)
    assert pipe.vae.config.scaling_factor == 0.5  # the manifest's, not the VAE folder's
    labels, steps = [3, 999], 10

    torch.manual_seed(123)  # the scheduler's per-step noise comes from the global RNG
    images = pipe(
        class_labels=labels,
        guidance_scale=1.0,
        generator=torch.Generator().manual_seed(0),
        num_inference_steps=steps,
        output_type="pt",
    ).images

    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.manual_seed(123)  # ditkit's ancestral sampler draws torch.randn_like per step, in order
    latents = GaussianDiffusion(learn_sigma=False).sample(
        model.double(), x_T, {"y": torch.tensor(labels)}, sampler="ddpm", steps=steps
    )
    with torch.no_grad():
        ours = (vae.double().decode(latents / 0.5).sample / 2 + 0.5).clamp(0, 1)
    # Tolerance: the model runs in float64 on both sides, but DDPMScheduler keeps alphas_cumprod
    # in float32 (relative error <= 6e-8 per coefficient) where ditkit uses float64, so the
    # per-step means differ by ~1e-7 relative; over 10 steps and the decoder, 1e-5 on [0, 1]
    # images bounds it with margin (measured: below 1e-6). A wrong schedule, spacing or noise
    # order is off by 1e-2 or more.
    assert images.std() > 0.01
    torch.testing.assert_close(images, ours, rtol=0, atol=1e-5)


def test_export_refusals(tmp_path, write_synthetic_shards):
    write_run(tmp_path, write_synthetic_shards, {**MODEL, "timestep_freq_shift": 0})
    ckpt = f"ckpt={tmp_path / 'last.ckpt'}"
    with pytest.raises(SystemExit, match="model.timestep_freq_shift=0"):
        main([ckpt, f"out={tmp_path / 'a'}"])
    main([ckpt, f"out={tmp_path / 'b'}", "approximate=true"])  # writes it, as asked
    with pytest.raises(SystemExit, match="is not empty"):
        main([ckpt, f"out={tmp_path / 'b'}", "approximate=true"])
    with pytest.raises(SystemExit, match="python -m ditkit.checkpoints.consolidate"):
        main([f"ckpt={tmp_path}", f"out={tmp_path / 'd'}"])
    with pytest.raises(SystemExit, match="format=onnx; valid: diffusers"):
        main([ckpt, f"out={tmp_path / 'c'}", "format=onnx"])
    with pytest.raises(SystemExit, match="unknown argument 'steps=3'"):
        main([ckpt, "steps=3"])
    # The module runs as a command, and fails on a bad argument before any heavy import.
    proc = subprocess.run(
        [sys.executable, "-m", "ditkit.export", "steps=3"], capture_output=True, text=True
    )
    assert proc.returncode != 0 and "unknown argument 'steps=3'" in proc.stderr


@pytest.mark.parametrize(
    "objective,variance,prediction",
    [
        ({"schedule": "linear", "learn_sigma": True}, "fixed_small", "epsilon"),
        (
            {"schedule": "cosine", "learn_sigma": False, "prediction": "v"},
            "fixed_large",
            "v_prediction",
        ),
        (
            {"num_timesteps": 500, "learn_sigma": False, "fixed_variance": "small"},
            "fixed_small",
            "epsilon",
        ),
    ],
)
def test_ddpm_scheduler_has_the_runs_schedule(objective, variance, prediction):
    """The exported DDPMScheduler's alphas_cumprod are ditkit's (float32 in diffusers: to 1e-6),
    for linear (also at another T) and cosine betas; the variance and prediction follow the run."""
    name, config = scheduler_config(
        {"_target_": "ditkit.objectives.GaussianDiffusion", **objective}
    )
    scheduler = DDPMScheduler(**config)
    assert (name, scheduler.config.variance_type, scheduler.config.prediction_type) == (
        "DDPMScheduler",
        variance,
        prediction,
    )
    ours = GaussianDiffusion(
        num_timesteps=objective.get("num_timesteps", 1000),
        schedule=objective.get("schedule", "linear"),
        learn_sigma=objective["learn_sigma"],
    ).alphas_cumprod
    torch.testing.assert_close(scheduler.alphas_cumprod.double(), ours, rtol=0, atol=1e-6)


def test_flow_scheduler_carries_the_shift():
    name, config = scheduler_config({"_target_": "ditkit.objectives.RectifiedFlow", "shift": 3.0})
    assert name == "FlowMatchEulerDiscreteScheduler"
    scheduler = FlowMatchEulerDiscreteScheduler(**config)
    # ditkit's Euler grid is 1, 3/4, 1/2, 1/4, 0 before the shift; diffusers' default spacing ends
    # at 1/1000, so a user passes the grid (docs/diffusers.md).
    scheduler.set_timesteps(sigmas=[1.0, 0.75, 0.5, 0.25])
    # SD3 eq. 23: sigma' = 3 s / (1 + 2 s), then diffusers appends the terminal 0.
    expected = torch.tensor([1.0, 9 / 10, 3 / 4, 1 / 2, 0.0])
    torch.testing.assert_close(scheduler.sigmas.double(), expected.double(), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="shift_reference_area"):
        scheduler_config(
            {"_target_": "ditkit.objectives.RectifiedFlow", "shift_reference_area": 1024}
        )


def test_mmdit_flow_run_exports_transformer_and_shifted_scheduler(tmp_path, write_synthetic_shards):
    """A text-to-image flow run: transformer/ is an SD3Transformer2DModel with the run's forward,
    scheduler/ a FlowMatchEulerDiscreteScheduler with the run's shift, and a VAE that the manifest
    names by hub id is recorded, not fetched (and there is no DiTPipeline index)."""
    from diffusers import SD3Transformer2DModel

    from ditkit.models import MMDiT

    sizes = {k: v for k, v in MMDIT.items() if k != "pos_embed_max_size"}
    model_cfg = {"_target_": "ditkit.models.MMDiT", **sizes, "qk_norm": True, "pretrained": None}
    shards = write_synthetic_shards(tmp_path / "shards", num_samples=4, num_shards=1)
    manifest = json.loads((shards / "manifest.json").read_text())
    manifest["vae"] = {
        "name": "stabilityai/sd-vae-ft-ema",
        "scale_factor": 0.18215,
        "latent_channels": 4,
    }
    (shards / "manifest.json").write_text(json.dumps(manifest))
    model = MMDiT(**{k: v for k, v in model_cfg.items() if k not in ("_target_", "pretrained")})
    randomize(model, seed=3)
    objective = {"_target_": "ditkit.objectives.RectifiedFlow", "shift": 3.0}
    config = {"model": model_cfg, "objective": objective, "data": {"root": str(shards)}}
    state = {f"{w}.{k}": v for w in ("ema", "model") for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "ditkit_config": config}, tmp_path / "last.ckpt")

    out = main([f"ckpt={tmp_path / 'last.ckpt'}", "format=diffusers", f"out={tmp_path / 'x'}"])
    assert not (out / "model_index.json").exists() and not (out / "vae").exists()
    record = json.loads((out / "ditkit_export.json").read_text())
    assert record["vae"] == {
        "name": "stabilityai/sd-vae-ft-ema",
        "scale_factor": 0.18215,
        "included": False,
    }
    assert FlowMatchEulerDiscreteScheduler.from_pretrained(out / "scheduler").config.shift == 3.0
    ref = SD3Transformer2DModel.from_pretrained(out / "transformer").eval()
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([250.0, 900.0])
    context, pooled = torch.randn(2, 5, 12), torch.randn(2, 6)
    with torch.no_grad():
        torch.testing.assert_close(
            ref(x, encoder_hidden_states=context, pooled_projections=pooled, timestep=t).sample,
            model.eval()(x, t, context, pooled),
            rtol=0,
            atol=1e-5,  # float32, as in tests/test_diffusers_interchange.py
        )
