"""diffusers `save_pretrained` folders in and out: DiT <-> DiTTransformer2DModel, MMDiT <->
SD3Transformer2DModel, UNet <-> UNet2DModel. diffusers' own classes are the reference: export
builds the diffusers model from the translated config and loads the mapped weights into it
strictly (so a mapping error fails here, not in a user's pipeline) before `save_pretrained`.

    to_diffusers(model, out_dir)      a ditkit backbone -> a diffusers model folder
    from_diffusers(path)              a model folder (or a pipeline folder) -> a ditkit backbone
    load_pretrained(model, path)      fine-tuning: the folder's weights into a configured model,
                                      after checking that its sizes fit (`model.pretrained=PATH`)
    instantiate_model(model_cfg)      Hydra `model` config -> backbone, honouring `pretrained`

The key mappings are in diffusers_dit.py, diffusers_sd3.py and diffusers_unet.py.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from . import diffusers_dit, diffusers_sd3, diffusers_unet

WEIGHTS = "diffusion_pytorch_model.safetensors"
# Pipeline folders keep the backbone in one of these subfolders.
SUBFOLDERS = ("transformer", "unet")
_CLASSES = {
    diffusers_dit.CLASS_NAME: diffusers_dit.dit_from_diffusers,
    diffusers_dit.LEGACY_CLASS_NAME: diffusers_dit.dit_from_diffusers,
    diffusers_sd3.CLASS_NAME: diffusers_sd3.mmdit_from_diffusers,
    diffusers_unet.CLASS_NAME: diffusers_unet.unet_from_diffusers,
}


def _converter(model: nn.Module):
    from ditkit.models import DiT, MMDiT, UNet

    for cls, fn, name in (
        (DiT, diffusers_dit.dit_to_diffusers, diffusers_dit.CLASS_NAME),
        (MMDiT, diffusers_sd3.mmdit_to_diffusers, diffusers_sd3.CLASS_NAME),
        (UNet, diffusers_unet.unet_to_diffusers, diffusers_unet.CLASS_NAME),
    ):
        if isinstance(model, cls):
            return fn, name
    raise TypeError(f"to_diffusers takes a ditkit DiT, MMDiT or UNet, not {type(model).__name__}")


def diffusers_model(model: nn.Module, approximate: bool = False):
    """The diffusers model (DiTTransformer2DModel, SD3Transformer2DModel or UNet2DModel) with the
    ditkit model's weights, in the ditkit model's dtype, eval mode. approximate: see
    to_diffusers."""
    import diffusers

    convert, name = _converter(model)
    config, state = convert(model, approximate)
    out = getattr(diffusers, name)(**config)
    # nn.Module.to: ModelMixin.to warns about fp32-pinned modules, which these classes have none of.
    nn.Module.to(out, next(model.parameters()).dtype)
    out.load_state_dict(state, strict=True)
    return out.eval()


def to_diffusers(model: nn.Module, out_dir: str | os.PathLike, approximate: bool = False) -> Path:
    """Write `model` as a diffusers `save_pretrained` folder (config.json +
    diffusion_pytorch_model.safetensors) that `<Class>.from_pretrained(out_dir)` loads and whose
    forward equals the ditkit model's. A DiT with the reference timestep frequencies
    (timestep_freq_shift=0) is refused unless approximate=True (diffusers' DiT hard-codes other
    ones; diffusers_dit.py). Returns out_dir."""
    out_dir = Path(out_dir)
    diffusers_model(model, approximate).save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def model_folder(path: str | os.PathLike) -> Path:
    """A model folder (config.json with `_class_name`), or the backbone subfolder of a pipeline
    folder (model_index.json)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(
            f"{path}: no such folder (a diffusers save_pretrained folder: a DiTTransformer2DModel, "
            "SD3Transformer2DModel or UNet2DModel, or a pipeline folder holding one)"
        )
    if (path / "config.json").is_file():
        return path
    for sub in SUBFOLDERS:
        if (path / sub / "config.json").is_file():
            return path / sub
    raise FileNotFoundError(
        f"{path} has no config.json (nor {'/ or '.join(SUBFOLDERS)}/config.json): not a diffusers "
        "model or pipeline folder"
    )


def read_folder(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config, state_dict) of a diffusers model folder: safetensors (single or sharded), or a
    .bin read with weights_only=True."""
    from safetensors.torch import load_file

    folder = model_folder(path)
    config = json.loads((folder / "config.json").read_text())
    index = folder / f"{WEIGHTS}.index.json"
    if (folder / WEIGHTS).is_file():
        state = load_file(folder / WEIGHTS)
    elif index.is_file():
        state = {}
        for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            state.update(load_file(folder / shard))
    elif (folder / "diffusion_pytorch_model.bin").is_file():
        state = torch.load(
            folder / "diffusion_pytorch_model.bin", map_location="cpu", weights_only=True
        )
    else:
        raise FileNotFoundError(f"{folder} holds a config.json but no {WEIGHTS} (or shards, .bin)")
    return config, state


def from_diffusers(path: str | os.PathLike, **overrides) -> nn.Module:
    """A diffusers model folder (or a pipeline folder: its transformer/ or unet/) -> the ditkit
    backbone that reproduces its forward, weights loaded strictly, eval mode. `overrides` set
    ditkit-only options (e.g. class_dropout_prob, caption_dropout_prob, context_len). A config
    that ditkit's blocks cannot represent raises naming the config key."""
    config, state = read_folder(path)
    name = config.get("_class_name")
    if name not in _CLASSES:
        raise ValueError(
            f"{model_folder(path)}: _class_name={name!r}; ditkit imports {', '.join(_CLASSES)}"
        )
    return _CLASSES[name](config, state, **overrides).eval()


# What a mismatch is fixed with: model attribute -> the config key(s) to change.
_KEYS = {
    "input_size": "model.input_size (data.latent_size)",
    "patch_size": "model.patch_size",
    "in_channels": "model.in_channels (data.latent_channels)",
    "hidden_size": "the width (model.hidden_size, or model.num_heads x model.head_dim)",
    "depth": "model.depth",
    "num_heads": "model.num_heads",
    "mlp_ratio": "model.mlp_ratio",
    "num_classes": "model.num_classes (data.num_classes)",
    "learn_sigma": "model.learn_sigma",
    "context_dim": "the text-embedding width data.context_dim",
    "pooled_dim": "the pooled text-embedding width data.pooled_dim",
    "qk_norm": "model.qk_norm",
    "pos_embed_max_size": "model.pos_embed_max_size",
    "pos_embed_base_size": "model.pos_embed_base_size",
    "dual_attention_layers": "model.dual_attention_layers",
}


def _misfits(model: nn.Module, source: nn.Module) -> list[str]:
    from ditkit.models import DiT, MMDiT

    names = [k for k in _KEYS if hasattr(source, k)]
    if isinstance(model, MMDiT):
        names.remove("input_size")  # the cropped table serves any grid up to its size
    problems = [
        f"{_KEYS[k]}: the folder has {getattr(source, k)!r}, the model {getattr(model, k)!r}"
        for k in names
        if getattr(model, k, None) != getattr(source, k)
    ]
    if isinstance(model, DiT):
        ours, theirs = model.t_embedder.freq_shift, source.t_embedder.freq_shift
        if ours != theirs:
            problems.append(
                f"model.timestep_freq_shift: the folder has {theirs} (diffusers' DiT timestep "
                f"frequencies), the model {ours}"
            )
        ours, theirs = model.blocks[0].norm2.eps, source.blocks[0].norm2.eps
        if ours != theirs:
            problems.append(
                f"model.mlp_norm_eps: the folder has {theirs} (its norm_eps), the model {ours}"
            )
    if (
        isinstance(model, MMDiT)
        and model.input_size // model.patch_size > source.pos_embed_max_size
    ):
        problems.append(
            f"model.input_size (data.latent_size) {model.input_size}: its grid exceeds the folder's "
            f"pos_embed_max_size {source.pos_embed_max_size}"
        )
    return problems


def _fit_source(config: dict, state: dict[str, torch.Tensor]) -> nn.Module:
    """The ditkit model a folder's config describes, on the meta device (sizes and options only,
    no memory): what load_pretrained compares the configured model with."""
    from ditkit.models import DiT, MMDiT, UNet

    name = config.get("_class_name")
    # Read the config (and, for SD3, compare the position table) on the CPU; build on meta.
    if name in (diffusers_dit.CLASS_NAME, diffusers_dit.LEGACY_CLASS_NAME):
        cls, kwargs = DiT, diffusers_dit.dit_kwargs_from_diffusers(config)
    elif name == diffusers_sd3.CLASS_NAME:
        cls, kwargs = MMDiT, diffusers_sd3.mmdit_kwargs_from_diffusers(config, state)
    elif name == diffusers_unet.CLASS_NAME:
        cls, kwargs = UNet, diffusers_unet.unet_kwargs_from_diffusers(config)
    else:
        raise ValueError(f"_class_name={name!r}; ditkit imports {', '.join(_CLASSES)}")
    with torch.device("meta"):
        model = cls(**kwargs)
    if cls is UNet:
        diffusers_unet.check_unet_config(config, model)
    return model


def _mapped_state(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A folder's state_dict in the ditkit layout of `model` (whose sizes it fits)."""
    from ditkit.models import DiT, MMDiT

    if isinstance(model, DiT):
        return diffusers_dit.dit_state_from_diffusers(state, model.depth, model.pos_embed)
    if isinstance(model, MMDiT):
        return diffusers_sd3.mmdit_state_from_diffusers(
            state, model.depth, model.qk_norm, model.dual_attention_layers
        )
    return diffusers_unet.unet_state_from_diffusers(state)


_MODEL_GROUPS = {"DiT": "dit_*", "MMDiT": "mmdit_*", "UNet": "unet*"}


def load_pretrained(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Start `model` (built from the run's config) from the weights of a diffusers folder, after
    checking that the folder's sizes fit the chosen variant and the data (text-embedding widths,
    latent channels, classes); the error names each one that does not. The folder's model is
    described on the meta device, so only one copy of the weights is ever in memory besides the
    file's. Returns model."""
    config, state = read_folder(path)
    source = _fit_source(config, state)
    if type(source) is not type(model):
        kind = type(source).__name__
        raise ValueError(
            f"model.pretrained={path} holds a {kind} (diffusers {config.get('_class_name')}); "
            f"the run's model is a {type(model).__name__}: choose model={_MODEL_GROUPS[kind]}"
        )
    problems = _misfits(model, source)
    if problems:
        raise ValueError(
            f"model.pretrained={path} does not fit the configured model:\n  "
            + "\n  ".join(problems)
        )
    model.load_state_dict(_mapped_state(model, state), strict=True)
    return model


def instantiate_model(model_cfg: Mapping) -> nn.Module:
    """Hydra `model` config -> backbone; with `pretrained` set, its weights come from that diffusers
    folder (load_pretrained). Every place that builds a model from a `model` config goes through
    here, so that the `pretrained` key never reaches a constructor."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = (
        OmegaConf.to_container(model_cfg, resolve=True)
        if not isinstance(model_cfg, dict)
        else dict(model_cfg)
    )
    pretrained = cfg.pop("pretrained", None)
    model = instantiate(cfg)
    if pretrained is not None:
        load_pretrained(model, pretrained)
    return model
