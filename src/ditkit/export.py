"""Export a ditkit training checkpoint as a diffusers folder.

    python -m ditkit.export ckpt=RUN/checkpoints/last.ckpt format=diffusers out=DIR
        [weights=ema|raw] [approximate=false] [vae=FOLDER]

Writes DIR/transformer (DiT, MMDiT) or DIR/unet (U-Net): the EMA backbone as a `save_pretrained`
folder; DIR/scheduler: the scheduler that matches the run's objective (DDPMScheduler for ddpm,
FlowMatchEulerDiscreteScheduler with the run's shift for flow); DIR/vae: the VAE the shards'
manifest names, when it is a local folder (or `vae=FOLDER`), with the manifest's scale factor;
DIR/ditkit_export.json: what was exported and the VAE reference when it is a hub name. A DiT
trained with objective=ddpm also gets model_index.json, so `DiTPipeline.from_pretrained(DIR)`
loads it (docs/diffusers.md shows the lines a diffusers user writes).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

KEYS = {
    "ckpt": "a ditkit .ckpt written by train.py",
    "format": "diffusers",
    "out": "the folder to write (must not exist or be empty)",
    "weights": "ema (default) | raw",
    "approximate": "true: export a DiT with the reference timestep frequencies anyway",
    "vae": "a local diffusers AutoencoderKL folder to include (default: the manifest's VAE)",
}
FORMATS = ("diffusers",)
_PREDICTION = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}
_SCHEDULE = {"linear": "linear", "cosine": "squaredcos_cap_v2"}


def parse(argv: list[str]) -> dict:
    args = {"weights": "ema", "approximate": "false", "vae": None, "format": "diffusers"}
    for item in argv:
        key, sep, value = item.partition("=")
        if not sep or key not in KEYS:
            raise SystemExit(
                f"ditkit.export: unknown argument {item!r}; valid: "
                + ", ".join(f"{k}= ({v})" for k, v in KEYS.items())
            )
        args[key] = value
    for key in ("ckpt", "out"):
        if not args.get(key):
            raise SystemExit(f"ditkit.export: {key}= is required ({KEYS[key]})")
    if args["format"] not in FORMATS:
        raise SystemExit(f"ditkit.export: format={args['format']}; valid: {', '.join(FORMATS)}")
    if args["approximate"] not in ("true", "false"):
        raise SystemExit(f"ditkit.export: approximate={args['approximate']}; use true or false")
    args["approximate"] = args["approximate"] == "true"
    return args


def scheduler_config(objective: dict) -> tuple[str, dict]:
    """(diffusers scheduler class, its config) for the run's `objective` config."""
    target = objective["_target_"]
    if target.endswith("GaussianDiffusion"):
        steps = int(objective.get("num_timesteps", 1000))
        schedule = objective.get("schedule", "linear")
        config = dict(
            num_train_timesteps=steps,
            beta_schedule=_SCHEDULE[schedule],
            # ditkit scales the linear betas to keep the total noise for another T (schedule.py).
            beta_start=1e-4 * 1000 / steps,
            beta_end=0.02 * 1000 / steps,
            prediction_type=_PREDICTION[objective.get("prediction", "eps")],
            # DiTPipeline splits a learned variance off before scheduler.step (pipeline_dit.py),
            # so a learned-sigma model samples with the fixed posterior variance there.
            variance_type="fixed_large"
            if not objective.get("learn_sigma", True)
            and objective.get("fixed_variance", "large") == "large"
            else "fixed_small",
            clip_sample=False,
            # ADM's respacing of N steps is linspace(0, T - 1, N) rounded: diffusers' "linspace".
            timestep_spacing="linspace",
        )
        return "DDPMScheduler", config
    if target.endswith("RectifiedFlow"):
        if float(objective.get("time_scale", 1000.0)) != 1000.0:
            raise ValueError(
                f"objective.time_scale={objective['time_scale']}: diffusers' flow schedulers feed "
                "the model sigma * 1000; export needs time_scale=1000"
            )
        if objective.get("shift_reference_area") is not None:
            raise ValueError(
                "objective.shift_reference_area is set (a resolution-dependent shift): diffusers' "
                "FlowMatchEulerDiscreteScheduler takes one fixed shift; export a run with a fixed "
                "objective.shift"
            )
        return "FlowMatchEulerDiscreteScheduler", dict(
            num_train_timesteps=1000, shift=float(objective.get("shift", 1.0))
        )
    raise ValueError(f"objective {target}: export knows ddpm and flow objectives")


def _write_vae(data: dict, vae_arg: str | None, out: Path) -> dict:
    """Copy a local VAE into out/vae with the shards' scale factor; return the reference."""
    from ditkit.evaluation.decoding import read_run_manifest

    manifest = read_run_manifest(data)
    info = (manifest or {}).get("vae") or {}
    name = vae_arg or info.get("name")
    scale = info.get("scale_factor")
    if name is None or name == "identity":
        return {"name": name, "scale_factor": scale, "included": False}
    if not os.path.isdir(name):
        return {"name": name, "scale_factor": scale, "included": False}
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(name)
    if scale is not None:
        vae.register_to_config(scaling_factor=float(scale))
    vae.save_pretrained(out / "vae", safe_serialization=True)
    return {"name": name, "scale_factor": scale, "included": True}


def export(args: dict) -> Path:
    import diffusers

    from ditkit.checkpoints import instantiate_model, read_checkpoint, to_diffusers

    out = Path(args["out"])
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"ditkit.export: out={out} exists and is not empty; choose a new folder")
    if Path(args["ckpt"]).is_dir():
        raise SystemExit(
            f"ditkit.export: ckpt={args['ckpt']} is a folder (a sharded FSDP checkpoint); make one "
            f"file first: python -m ditkit.checkpoints.consolidate {args['ckpt']}, then pass "
            f"ckpt={args['ckpt']}.consolidated"
        )
    ckpt = read_checkpoint(args["ckpt"], args["weights"])
    if ckpt.kind != "ditkit":
        raise SystemExit(
            f"ditkit.export: ckpt={args['ckpt']} is a {ckpt.kind} file, not a ditkit training "
            "checkpoint; load it with ditkit.checkpoints.load_official_dit and call to_diffusers"
        )
    run = ckpt.run_config
    model = instantiate_model({**run["model"], "pretrained": None})
    model.load_state_dict(ckpt.state_dict, strict=True)
    kind = type(model).__name__
    sub = "unet" if kind == "UNet" else "transformer"
    to_diffusers(model.eval(), out / sub, approximate=args["approximate"])
    scheduler_name, scheduler_cfg = scheduler_config(run["objective"])
    getattr(diffusers, scheduler_name)(**scheduler_cfg).save_pretrained(out / "scheduler")
    vae = _write_vae(run.get("data") or {}, args["vae"], out)
    model_class = json.loads((out / sub / "config.json").read_text())["_class_name"]
    if kind == "DiT" and scheduler_name == "DDPMScheduler":
        index = {
            "_class_name": "DiTPipeline",
            "_diffusers_version": diffusers.__version__,
            "transformer": ["diffusers", model_class],
            "scheduler": ["diffusers", scheduler_name],
            "vae": ["diffusers", "AutoencoderKL"] if vae["included"] else [None, None],
        }
        (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    record = {
        "ckpt": str(args["ckpt"]),
        "weights": args["weights"],
        "model": model_class,
        "scheduler": scheduler_name,
        "shift": scheduler_cfg.get("shift"),
        "vae": vae,
        "approximate": args["approximate"],
    }
    (out / "ditkit_export.json").write_text(json.dumps(record, indent=2) + "\n")
    return out


def main(argv: list[str] | None = None) -> Path:
    args = parse(sys.argv[1:] if argv is None else argv)
    try:
        out = export(args)
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"ditkit.export: {err}") from err
    print(f"ditkit.export: wrote {out}")
    return out


if __name__ == "__main__":
    main()
