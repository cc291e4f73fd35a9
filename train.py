"""Train a Diffusion Transformer.

    python train.py experiment=quickstart                  # built-in digits, CPU, a few minutes
    python train.py experiment=dit_xl2_in256 data.root=/data/in256-latents
    python train.py model=dit_b objective=flow strategy=fsdp trainer.devices=8
    python train.py -m model=dit_s,dit_b objective=ddpm,flow   # a sweep, one folder per run

Each run lives in ${paths.output_dir}/<run name> (the overrides); rerunning a command resumes it
when it trains the same thing (resume=force overrides that check).
"""

import secrets
import warnings
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

CONF = Path(__file__).resolve().parent / "conf"

# The EMA copy of the model is in eval mode on purpose (it only samples); Lightning warns about it.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")


def run_name(overrides: list[str]) -> str:
    """The run's folder name from the command-line overrides (`ditkit.training.identity.run_name`:
    experiment/model/objective/data first, "default" when none changes what is trained)."""
    from ditkit.training.identity import run_name as name_of

    return name_of(list(overrides))


OmegaConf.register_new_resolver("ditkit.run_name", run_name, replace=True)


def wandb_run_id(run_dir: Path) -> str:
    """One W&B id per run folder, kept in <run>/wandb_id, so a resumed run continues its W&B run."""
    path = run_dir / "wandb_id"
    if path.is_file():
        return path.read_text().strip()
    from ditkit.checkpoints.atomic import atomic_write

    run_id = secrets.token_hex(4)
    run_dir.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "w") as f:
        f.write(run_id)
    return run_id


def train(cfg: DictConfig) -> Path:
    """Build everything from the composed config and fit; returns the run folder."""
    # Heavy imports here, after Hydra has composed and checked the config: config errors come first.
    import lightning as L
    import torch
    from hydra.utils import instantiate
    from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

    from ditkit.checkpoints import find_resume_checkpoint, instantiate_model
    from ditkit.training.checks import (
        ConfigError,
        check_experiment_sizes,
        check_model_fits_data,
        check_resume,
        fill_data_keys,
    )
    from ditkit.training.elastic import isolate_restarts
    from ditkit.training.identity import fingerprint, identity_mismatch, record_identity

    hydra_cfg = HydraConfig.get()
    choices = hydra_cfg.runtime.choices
    check_experiment_sizes(CONF, choices.get("experiment"), choices.get("model"))
    # Shard sets say their latent shape, image size, classes and text shape: fill in what the command
    # line did not set (checking what it did) before anything reads them.
    for key, value in fill_data_keys(cfg, list(hydra_cfg.overrides.task)).items():
        rank_zero_info(f"ditkit: data.{key}={value} (from the shards' manifest)")
        cfg.data[key] = value
    rank_zero_info(OmegaConf.to_yaml(cfg, resolve=True))
    check_model_fits_data(
        OmegaConf.to_container(cfg.model, resolve=True),
        OmegaConf.to_container(cfg.data, resolve=True),
    )
    run_dir = Path(cfg.paths.run_dir)
    check_resume(cfg.resume, cfg.ckpt_path, cfg.paths.checkpoint_dir)

    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    # Reads the shards' manifest now: shards that do not fit the config fail here.
    datamodule.setup("fit")
    # Continue this folder's run only if it trains the same thing (ditkit.training.identity).
    identity = fingerprint(OmegaConf.to_container(cfg, resolve=True), datamodule.manifest)
    ckpt_path = cfg.ckpt_path
    if ckpt_path is None and cfg.resume != "never":
        ckpt_path = find_resume_checkpoint(cfg.paths.checkpoint_dir)
        mismatch = identity_mismatch(run_dir, identity) if ckpt_path is not None else None
        if mismatch is not None and cfg.resume == "auto":
            raise ConfigError(mismatch)
        if mismatch is not None:
            rank_zero_info(f"ditkit: resume=force, continuing anyway. {mismatch}")
    if rank_zero_only.rank == 0:
        record_identity(run_dir, identity)
    # model.pretrained=FOLDER: the weights of a diffusers folder, checked against the config first.
    model = instantiate_model(cfg.model)
    objective = instantiate(cfg.objective)
    # Plain Python values (lists, not ListConfig) go into the optimizer's state_dict, which
    # checkpoints store and load with weights_only=True.
    module = instantiate(cfg.module)(
        model=model,
        objective=objective,
        optimizer=instantiate(cfg.optimizer, _convert_="all"),
        lr_schedule=instantiate(cfg.lr_schedule, _convert_="all"),
        run_config=OmegaConf.to_container(cfg, resolve=True),
    )
    callbacks = [
        instantiate(c) for c in cfg.callbacks.values() if c is not None and "_target_" in c
    ]
    logger_cfg = cfg.logger
    if (
        str(logger_cfg.get("_target_", "")).endswith("WandbLogger")
        and logger_cfg.get("id") is None
        and rank_zero_only.rank == 0
    ):  # only rank 0 talks to W&B
        logger_cfg = OmegaConf.merge(logger_cfg, {"id": wandb_run_id(run_dir)})
    logger = instantiate(logger_cfg)
    # Under torchrun --max-restarts, a restarted group must not read the killed attempt's addresses
    # from torchrun's store (ditkit.training.elastic): set up before Lightning forms the group.
    isolate_restarts()
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=logger)
    if logger is not None and trainer.is_global_zero:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))

    if ckpt_path is not None:
        rank_zero_info(f"ditkit: resuming from {ckpt_path}")
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    finally:
        if type(logger).__name__ == "WandbLogger":
            import wandb

            wandb.finish()  # a sweep runs several jobs in one process: close this run before the next
    return run_dir


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    from ditkit.checkpoints.lock import run_lock
    from ditkit.training.identity import removed_on_failure

    # One run per folder: a second process on this folder (a duplicate submission, a requeue while
    # the old job still runs) is refused, naming the holder; a killed holder releases it. The lock
    # is taken before Hydra writes into the folder (hydra.callbacks.run_lock; here for a -m sweep's
    # jobs). Inside it, a command that fails before its first checkpoint removes the folder it made.
    with run_lock(cfg.paths.run_dir) as lock:
        made_here = None if lock is None else lock.created  # None: not the first process
        with removed_on_failure(cfg.paths.run_dir, cfg.paths.checkpoint_dir, made_here):
            train(cfg)


if __name__ == "__main__":
    main()
