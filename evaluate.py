"""Score a checkpoint: sample N images on every rank, stream them through Inception, write FID / IS.

    python evaluate.py ckpt=outputs/<run>/checkpoints/last.ckpt fid.reference=/data/in256-ref.npz
    python evaluate.py ckpt=DiT-XL-2-256x256.pt cfg_scale=1.5 guidance_channels=3 fid.reference=REF
    python evaluate.py ckpt=... devices=8 precision=bf16-mixed   # or start it with torchrun / srun
    python evaluate.py ckpt=<text-to-image run>/checkpoints/last.ckpt prompts=prompts.txt sampler=euler

Outputs in the run folder (${output_dir}/<overrides>): metrics.json, samples.npz (ADM format: arr_0
uint8 NHWC, arr_1 labels), samples.png; logged to W&B. Every finished batch is kept in <run>/parts
until the end, so rerunning an interrupted command continues where it stopped. With prompts=FILE
(one prompt per line, a text-to-image checkpoint): per_prompt samples of each prompt in prompts.png
(one row per prompt) and prompts.npz (arr_0 uint8 NHWC, prompts), no scores.
"""

import hashlib
import json
import shutil
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

OFFICIAL_VAE = "stabilityai/sd-vae-ft-ema"  # DiT's sample_ddp.py default
# How evaluate.py takes a local VAE folder (the `vae` group is empty by default, so the group first).
VAE_OVERRIDE = "vae=sd_ft_ema vae.pretrained=DIR"


def run_name(overrides: str) -> str:
    """The run folder's name: the overrides that define the samples, "/" made safe, long ones
    hashed."""
    name = (overrides or "default").replace("/", "_")
    if len(name) > 120:
        name = f"{name[:100]}-{hashlib.sha1(name.encode()).hexdigest()[:10]}"
    return name


OmegaConf.register_new_resolver("ditkit.eval_run_name", run_name, replace=True)


def register_configs() -> None:
    """The `sampler` group's choices come from the sampler registry (one definition per sampler)."""
    from ditkit.objectives.samplers import register_configs as register_samplers

    register_samplers()


def _checkpoint_file(ckpt: str, run_dir: Path) -> Path:
    """`ckpt`, or for a sharded (FSDP) checkpoint folder its consolidated copy in the run folder."""
    path = Path(ckpt)
    if not path.is_dir() or not (path / ".metadata").is_file():
        return path
    from ditkit.checkpoints import consolidate_checkpoint

    out = run_dir / "consolidated.ckpt"
    if not out.is_file():  # made once, before the other ranks start
        run_dir.mkdir(parents=True, exist_ok=True)
        consolidate_checkpoint(path, out)
    return out


def build(cfg: DictConfig, ckpt):
    """(model, objective, vae, data image size or None) for a read checkpoint, with clear errors for
    misfits."""
    from hydra.utils import instantiate

    from ditkit.checkpoints import dit_config_from_state_dict
    from ditkit.data.vae import load_vae
    from ditkit.evaluation.decoding import run_vae
    from ditkit.evaluation.objective_terms import sampling_objective
    from ditkit.models import DiT, check_backbone

    vae_cfg = cfg.get("vae")
    if ckpt.kind == "ditkit":
        run = ckpt.run_config
        model_cfg = dict(run["model"])
        # Checkpoints of ditkit 0.1 name activation checkpointing in the model config; it is applied
        # from outside the model now (module.activation_checkpointing) and means nothing here.
        model_cfg.pop("grad_checkpointing", None)
        # The diffusers folder training started from: the checkpoint's weights replace it.
        model_cfg.pop("pretrained", None)
        model = instantiate(model_cfg)
        objective_cfg = cfg.objective if cfg.get("objective") is not None else run["objective"]
        vae = run_vae(
            run["data"],
            vae_cfg.pretrained if vae_cfg else None,
            vae_cfg.subfolder if vae_cfg else None,
            chosen=vae_cfg is not None,
            override=VAE_OVERRIDE,
        )
        image_size = run["data"].get("image_size")
    else:
        config = dit_config_from_state_dict(ckpt.state_dict)
        config["num_heads"] = cfg.num_heads or config["num_heads"]
        if config["num_heads"] is None:
            raise ValueError(
                f"ckpt={cfg.ckpt}: width {config['hidden_size']} is not a published DiT variant; "
                "pass num_heads="
            )
        model = DiT(**config)
        objective_cfg = (
            cfg.objective
            if cfg.get("objective") is not None
            else {"_target_": "ditkit.objectives.GaussianDiffusion"}
        )
        pretrained = vae_cfg.pretrained if vae_cfg else OFFICIAL_VAE
        vae = load_vae(
            pretrained or "identity",
            vae_cfg.subfolder if vae_cfg else None,
            override=VAE_OVERRIDE,
        )
        image_size = None
    check_backbone(model, f"the model of ckpt={cfg.ckpt}")
    if tuple(model.condition_keys) != ("y",) and cfg.get("prompts") is None:
        raise ValueError(
            f"ckpt={cfg.ckpt}: evaluate.py scores class-conditional models; this one "
            f"({type(model).__name__}) has "
            "no classes (a text-to-image model samples from prompts=FILE)"
        )
    try:
        model.load_state_dict(ckpt.state_dict, strict=True)
    except RuntimeError as err:
        raise ValueError(
            f"ckpt={cfg.ckpt}: the weights do not fit the model it describes: {err}"
        ) from err
    objective_cfg = OmegaConf.create(
        OmegaConf.to_container(objective_cfg)
        if isinstance(objective_cfg, DictConfig)
        else dict(objective_cfg)
    )
    if "learn_sigma" in objective_cfg or objective_cfg["_target_"].endswith("GaussianDiffusion"):
        # Follows the model (objective/ddpm.yaml interpolates it).
        objective_cfg.learn_sigma = bool(model.learn_sigma)
    # Training-only terms (probes, projectors) are dropped; those sampling needs (REG) kept, with
    # their checkpointed (EMA) weights.
    objective = sampling_objective(objective_cfg, model, ckpt.terms, f"ckpt={cfg.ckpt}")
    return model.eval(), objective, vae, image_size


def sampler_settings(cfg: DictConfig, objective) -> dict:
    """objective.sample keyword arguments from the sampler group (null: the objective's evaluation
    protocol, ddpm 250 for ddpm and sde 250 for flow, from the sampler registry) and the guidance
    keys."""
    from ditkit.objectives.samplers import resolve

    sampler = cfg.get("sampler")
    if sampler is not None:
        sampler = OmegaConf.to_container(sampler)
    spec, steps, options = resolve(sampler, objective.name, "evaluate")
    interval = cfg.guidance_interval
    return {
        "sampler": spec.name,
        "steps": steps,
        **options,
        "cfg_scale": float(cfg.cfg_scale),
        "guidance_channels": cfg.guidance_channels,
        "guidance_interval": None if interval is None else [float(v) for v in interval],
    }


def evaluate_prompts(cfg: DictConfig, run_dir: Path) -> dict:
    """prompts=FILE: per_prompt samples of each prompt from a text-to-image (MMDiT) checkpoint, the
    prompts embedded by the text encoders its training shards' manifest names; one process. Writes
    prompts.png and prompts.npz."""
    import lightning as L
    import numpy as np
    from PIL import Image

    from ditkit.checkpoints import atomic_write, read_checkpoint
    from ditkit.data.text import text_encoders_from_manifest
    from ditkit.evaluation.decoding import make_decoder, read_run_manifest
    from ditkit.evaluation.prompts import read_prompts, sample_prompts
    from ditkit.evaluation.samples_io import image_grid

    prompts = read_prompts(cfg.prompts)
    ckpt = read_checkpoint(_checkpoint_file(cfg.ckpt, run_dir), cfg.weights, cfg.ema)
    if ckpt.kind != "ditkit":
        raise ValueError(
            f"prompts= needs a ditkit checkpoint of a text-to-image model (MMDiT); ckpt={cfg.ckpt} is not one"
        )
    model, objective, vae, _ = build(cfg, ckpt)
    if set(model.condition_keys) != {"context", "pooled"}:
        raise ValueError(
            f"prompts= needs a text-to-image model (MMDiT); ckpt={cfg.ckpt} holds a {type(model).__name__}"
        )
    data = ckpt.run_config["data"]
    manifest = read_run_manifest(data)
    if manifest is None:
        raise FileNotFoundError(
            f"the checkpoint's training shards ({data.get('root')}) are not readable here: their "
            "manifest names the text encoders that embed the prompts"
        )
    fabric = L.Fabric(accelerator=cfg.accelerator, devices=1, precision=cfg.precision)
    for term in objective.terms.values():
        term.to(fabric.device)
    images = sample_prompts(
        model.to(fabric.device),
        objective,
        make_decoder(vae, fabric.device),
        text_encoders_from_manifest(manifest).to(fabric.device),
        prompts,
        cfg.per_prompt,
        seed=cfg.seed,
        batch_size=cfg.batch_size,
        sample_kwargs=sampler_settings(cfg, objective),
        device=fabric.device,
        autocast=fabric.autocast,
        progress=cfg.progress,
    )
    run_dir.mkdir(parents=True, exist_ok=True)
    with atomic_write(run_dir / "prompts.png") as f:
        Image.fromarray(image_grid(images, nrow=cfg.per_prompt)).save(f, format="PNG")
    with atomic_write(run_dir / "prompts.npz") as f:
        np.savez(f, arr_0=images.permute(0, 2, 3, 1).numpy(), prompts=np.array(prompts))
    result = {
        "grid": str(run_dir / "prompts.png"),
        "prompts": len(prompts),
        "per_prompt": cfg.per_prompt,
    }
    print(json.dumps(result))
    print(f"evaluate.py: samples in {run_dir / 'prompts.npz'}, grid {run_dir / 'prompts.png'}")
    return result


def evaluate(cfg: DictConfig, run_dir: Path) -> dict:
    """Everything that can be wrong is checked before the first sample; returns the metrics (on
    every rank)."""
    if cfg.get("prompts") is not None:
        return evaluate_prompts(cfg, run_dir)
    import lightning as L

    from ditkit.checkpoints import atomic_write, read_checkpoint
    from ditkit.evaluation import (
        METRICS,
        InceptionMetrics,
        PartStore,
        SamplingPlan,
        check_reference,
        inception_fingerprint,
        load_inception,
        load_reference,
        plan_batches,
        sample_and_score,
        save_grid,
        write_adm_npz,
    )
    from ditkit.evaluation.decoding import make_decoder
    from ditkit.evaluation.encoder_fd import (
        EncoderStats,
        check_encoder_reference,
        fd_encoder,
        is_fd_metric,
    )
    from ditkit.models.encoders import FrozenEncoder

    # The checkpoint first: a missing or unreadable one is what to fix first, whatever else is wrong.
    ckpt = read_checkpoint(_checkpoint_file(cfg.ckpt, run_dir), cfg.weights, cfg.ema)
    metrics = list(cfg.metrics)
    unknown = {m for m in metrics if m not in METRICS and not is_fd_metric(m)}
    if unknown:
        raise ValueError(
            f"metrics={metrics}: unknown {sorted(unknown)}; choose from {list(METRICS)} or "
            "fd_<encoder> (e.g. fd_dinov2)"
        )
    fd_names = {m: fd_encoder(m) for m in metrics if is_fd_metric(m)}
    needs_reference = bool({"fid", "kid", "prc"} & set(metrics)) or bool(fd_names)
    if needs_reference and cfg.fid.reference is None:
        raise ValueError(
            f"metrics={metrics} need fid.reference=FILE.npz (make one with python -m "
            "data_pipelines.fid_reference)"
        )
    reference = load_reference(cfg.fid.reference) if needs_reference else None
    if reference is not None and {"kid", "prc"} & set(metrics) and reference.features is None:
        raise ValueError(
            f"metrics kid / prc need reference features: make {cfg.fid.reference} again with features=10000"
        )
    for name in fd_names.values():
        check_encoder_reference(name, reference.encoders.get(name), cfg.fid.reference, None)
    # The encoders of the fd_ metrics: the reference's weights and resolution unless
    # fd.pretrained.<name>= points elsewhere (a local copy on an offline cluster).
    fd_pretrained = dict(cfg.get("fd", {}).get("pretrained") or {})
    encoders = {
        metric: EncoderStats(
            FrozenEncoder(
                name,
                pretrained=fd_pretrained.get(name) or reference.encoders[name]["pretrained"],
                resolution=int(reference.encoders[name]["resolution"]),
            )
        )
        for metric, name in fd_names.items()
    }
    model, objective, vae, data_image_size = build(cfg, ckpt)
    sample_kwargs = sampler_settings(cfg, objective)
    image_size = model.input_size * vae.downsample
    if data_image_size is not None and data_image_size != image_size:
        raise ValueError(
            f"the model samples {image_size} px images but was trained on {data_image_size} px: check vae="
        )
    if reference is not None:
        check_reference(reference, cfg.fid.reference, image_size)

    fabric = L.Fabric(
        accelerator=cfg.accelerator,
        devices=cfg.devices,
        num_nodes=cfg.num_nodes,
        precision=cfg.precision,
    )
    fabric.launch()
    device, rank, world = fabric.device, fabric.global_rank, fabric.world_size
    extractor = load_inception(cfg.fid.inception_weights, device)
    if reference is not None:
        check_reference(reference, cfg.fid.reference, image_size, inception_fingerprint(extractor))
    model = model.to(device)
    for term in objective.terms.values():  # the terms sampling needs (REG's token heads)
        term.to(device)
    if cfg.compile:
        from ditkit.training.parallel import compile_blocks

        compile_blocks(model)  # each block, as training's module.compile and benchmarks/sample.py
    plan = SamplingPlan(
        num_samples=cfg.num_samples,
        batch_size=cfg.batch_size,
        num_classes=model.num_classes,
        latent_shape=(model.in_channels, model.input_size, model.input_size),
        seed=cfg.seed,
        sample_kwargs=sample_kwargs,
    )
    settings = {
        "ckpt": str(Path(cfg.ckpt).resolve()),
        "weights": cfg.weights,
        "ema": cfg.ema,
        "num_samples": cfg.num_samples,
        "batch_size": cfg.batch_size,
        "seed": cfg.seed,
        "precision": cfg.precision,
        "vae": vae.name,
        "image_size": image_size,
        **sample_kwargs,
    }
    store = PartStore(run_dir / "parts", settings) if rank == 0 else None
    if store is not None:
        done = sum(
            b - a for a, b in plan_batches(cfg.num_samples, cfg.batch_size) if store.load(a, b - a)
        )
        if done:
            print(
                f"evaluate.py: resuming the interrupted evaluation in {run_dir}: {done} of "
                f"{cfg.num_samples} samples are done (parts/), sampling the other "
                f"{cfg.num_samples - done}"
            )
    wandb_run = start_wandb(cfg, run_dir) if rank == 0 else None
    fabric.barrier()  # rank 0 checked / wrote plan.json first
    store = store or PartStore(run_dir / "parts", settings)
    scores = InceptionMetrics(metrics, encoders)
    kept = sample_and_score(
        model,
        objective,
        make_decoder(vae, device),
        extractor,
        plan,
        scores,
        rank=rank,
        world_size=world,
        device=device,
        autocast=fabric.autocast,
        store=store,
        progress=cfg.progress,
        keep=cfg.grid_images,
    )
    result = scores.compute(reference, device)
    fabric.barrier()  # every part is on disk
    if rank == 0:
        result = {**result, "reference": cfg.fid.reference, "settings": settings}
        write_adm_npz(
            run_dir / "samples.npz",
            store,
            [s for s, _ in plan_batches(cfg.num_samples, cfg.batch_size)],
        )
        if len(kept):  # grid_images=0: no grid
            save_grid(run_dir / "samples.png", kept)
        with atomic_write(run_dir / "metrics.json", "w") as f:
            json.dump(result, f, indent=2)
        log_wandb(wandb_run, run_dir, result, kept)
        shutil.rmtree(run_dir / "parts")
        print(
            json.dumps(
                {
                    k: result[k]
                    for k in ("fid", "is", "kid", "precision", "recall", *fd_names)
                    if k in result
                }
            )
        )
        grid = f", grid {run_dir / 'samples.png'}" if len(kept) else ""
        print(
            f"evaluate.py: metrics in {run_dir / 'metrics.json'}, samples in "
            f"{run_dir / 'samples.npz'}{grid}"
        )
    fabric.barrier()
    return result


def start_wandb(cfg: DictConfig, run_dir: Path):
    """A W&B run (rank 0, at the start so that a bad setting fails before sampling); offline without
    an API key."""
    if not cfg.wandb.enabled:
        return None
    import wandb

    kwargs = dict(
        project=cfg.wandb.project,
        name=cfg.wandb.name or run_dir.name,
        dir=str(run_dir),
        tags=list(cfg.wandb.tags),
        job_type="evaluate",
        config=OmegaConf.to_container(cfg, resolve=True),
    )
    try:
        return wandb.init(**kwargs)
    except (
        wandb.errors.UsageError
    ) as err:  # no account here: keep the run, upload later with `wandb sync`
        print(f"W&B: {err}; logging offline to {run_dir}/wandb (upload with `wandb sync`)")
        return wandb.init(mode="offline", **kwargs)


def log_wandb(run, run_dir: Path, result: dict, grid_images) -> None:
    if run is None:
        return
    import wandb

    from ditkit.evaluation.samples_io import image_grid

    images = {"eval/samples": wandb.Image(image_grid(grid_images))} if len(grid_images) else {}
    run.log(
        {**{f"eval/{k}": v for k, v in result.items() if isinstance(v, (int, float))}, **images}
    )
    run.save(str(run_dir / "metrics.json"), base_path=str(run_dir))
    run.finish()


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    evaluate(cfg, Path(HydraConfig.get().runtime.output_dir))


if __name__ == "__main__":
    register_configs()
    main()
