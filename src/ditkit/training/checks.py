"""Config checks that run before anything is built, so a bad run fails in its first seconds with a
message that names the key to change."""

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ditkit.checkpoints.resume import checkpoint_step
from ditkit.data.datamodule import open_manifest
from ditkit.data.manifest_keys import fill_from_manifest
from ditkit.models import DIT_VARIANTS

INT_KEYS = (
    "input_size",
    "patch_size",
    "in_channels",
    "hidden_size",
    "depth",
    "num_heads",
    "num_classes",
)


class ConfigError(ValueError):
    """A config value that cannot work; the message says which key to change and how."""


def check_model_fits_data(model: Mapping[str, Any], data: Mapping[str, Any]) -> None:
    """model: the resolved `model` config (DiT kwargs, `variant` for build_dit); data: the `data`
    config with `latent_size`, `latent_channels`, `num_classes`. Raises ConfigError."""
    for key in INT_KEYS:
        value = model.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise ConfigError(f"model.{key}={value!r} must be an integer")
    sizes = dict(DIT_VARIANTS.get(model.get("variant"), {}))
    sizes.update(
        {k: model[k] for k in ("depth", "hidden_size", "num_heads") if model.get(k) is not None}
    )
    hidden, heads = sizes.get("hidden_size"), sizes.get("num_heads")
    if hidden is not None and heads is not None and hidden % heads:
        divisors = [h for h in range(1, 33) if hidden % h == 0]
        raise ConfigError(
            f"model.hidden_size={hidden} is not divisible by model.num_heads={heads}; choose "
            f"num_heads from {divisors}"
        )
    size, patch = model.get("input_size"), model.get("patch_size")
    if size is not None and patch is not None:
        if patch < 1 or size % patch:
            valid = [p for p in (1, 2, 4, 8, 16) if size % p == 0]
            raise ConfigError(
                f"model.patch_size={patch} does not divide the latent size {size} (data.latent_size); "
                f"use model.patch_size={'|'.join(map(str, valid))} or data whose latent size it divides"
            )
    if data.get("context_dim") is not None and "context_dim" not in model:
        raise ConfigError(
            f"the data yields text embeddings (data.context_dim={data['context_dim']}) but model "
            f"{model.get('_target_')} takes class labels: use a text-to-image model "
            "(model=mmdit_d12|mmdit_d24), "
            "or data without text (unset data.context_len/context_dim/pooled_dim to train on the labels)"
        )
    for model_key, data_key in (
        ("input_size", "latent_size"),
        ("in_channels", "latent_channels"),
        ("num_classes", "num_classes"),
    ):
        if (
            model.get(model_key) is not None
            and data.get(data_key) is not None
            and model[model_key] != data[data_key]
        ):
            raise ConfigError(
                f"model.{model_key}={model[model_key]} but the data has "
                f"{data_key}={data[data_key]}: the model must be "
                f"built for the data's latents. Drop the model.{model_key} override (it follows "
                f"data.{data_key}) "
                f"or choose data that matches."
            )


def fill_data_keys(cfg: Any, overrides: list[str]) -> dict[str, Any]:
    """cfg: the composed run config; overrides: Hydra's task overrides. For shards that are not
    built in, the data keys the manifest knows and the command line left alone, as
    ``{key: manifest value}`` (`ditkit.data.manifest_keys.fill_from_manifest`); those the command
    line set are checked, every mismatch in one error."""
    from omegaconf import OmegaConf

    data = OmegaConf.to_container(cfg.data, resolve=True)
    if data.get("builtin") is not None or (data.get("root") is None) == (data.get("urls") is None):
        return {}  # built-in sets are configured exactly; a missing data.root fails in the datamodule
    manifest, _ = open_manifest(data.get("root"), data.get("urls"), data.get("manifest"))
    explicit = [
        o.partition("=")[0].lstrip("+~").removeprefix("data.")
        for o in overrides
        if o.lstrip("+~").startswith("data.")
    ]
    takes_text = "context_dim" in cfg.model
    return fill_from_manifest(data, manifest, explicit, takes_text)


def check_resume(resume: str, ckpt_path: str | None, checkpoint_dir: str | Path) -> None:
    """resume: "auto" | "force" | "never"; ckpt_path: an explicit checkpoint or None."""
    if resume not in ("auto", "force", "never"):
        raise ConfigError(
            f"resume={resume!r}: use resume=auto (continue this run's folder when it trains the "
            "same thing), resume=force (continue it even if not) or resume=never"
        )
    if ckpt_path is not None:
        if not Path(ckpt_path).exists():
            raise ConfigError(f"ckpt_path={ckpt_path} does not exist")
        try:
            checkpoint_step(ckpt_path)
        except ValueError as e:
            raise ConfigError(
                f"ckpt_path: {e}. Pick another checkpoint, or resume=auto to take the newest good one"
            ) from e
    folder = Path(checkpoint_dir)
    if resume == "never" and ckpt_path is None and folder.is_dir() and any(folder.iterdir()):
        raise ConfigError(
            f"resume=never, but {folder} already holds checkpoints that a fresh run would overwrite: use "
            f"resume=auto to continue it, run_name=<new name> for a new run, or delete the folder"
        )


def check_experiment_sizes(conf_dir: str | Path, experiment: str | None, model: str | None) -> None:
    """An experiment that sizes its models per model (conf/experiment_model/<experiment>/*.yaml)
    must have a size for the chosen one: otherwise the model would train at its full size, e.g. a
    whole DiT-B on a CPU for experiment=quickstart model=dit_b."""
    if experiment is None or model is None:
        return
    folder = Path(conf_dir) / "experiment_model" / experiment
    if not folder.is_dir():
        return
    sized = sorted(p.stem for p in folder.glob("*.yaml"))
    if model not in sized:
        raise ConfigError(
            f"experiment={experiment} has model sizes for model={'|'.join(sized)} only "
            f"({folder}); model={model} would train at its full size. Choose one of those, or "
            f"add {folder / (model + '.yaml')} with the sizes for this experiment."
        )
