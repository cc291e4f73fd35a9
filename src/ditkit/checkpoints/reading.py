"""What `evaluate.py ckpt=...` can read, told apart early, with an error that says what to pass
instead.

Kinds:
  ditkit    a Lightning checkpoint written by train.py: `state_dict` holds `model.*` (raw) and `ema.*`
            (EMA) weights, `extra_ema.<name>.*` for each module.extra_ema, `ditkit_config` the run's
            resolved config (model, objective, data).
  official  a released DiT `.pt` (bare EMA state_dict) or a reference-training checkpoint
            {"model", "ema", ...}.
  weights   a `.safetensors` of a DiT state_dict (e.g. EMA weights exported from a ditkit checkpoint).
"""

from __future__ import annotations

import os
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

WEIGHTS = ("ema", "raw")
# What torch.load raises on a truncated, corrupt or foreign file (and on a refused pickle).
UNREADABLE = (
    RuntimeError,
    EOFError,
    pickle.UnpicklingError,
    zipfile.BadZipFile,
    OSError,
    ValueError,
)


def load_torch_file(path: str | os.PathLike, mmap: bool = False):
    """torch.load(path, weights_only=True) on the CPU; UNREADABLE errors pass through for the
    caller to name what was expected."""
    return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)


@dataclass
class LoadedCheckpoint:
    """state_dict in the model's own layout; run_config: the ditkit run's config (plain dict) or
    None."""

    kind: str
    state_dict: dict[str, torch.Tensor]
    run_config: dict | None = None
    # {term name: its state_dict} of the objective's modules (ditkit checkpoints): the EMA copy
    # (`ema_objective.<name>.*`, module.ema_objective_modules=true) with weights=ema, else the
    # trained one (`objective_modules.<name>.*`); what a term used in sampling (REG) loads.
    terms: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)


def _strip(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def read_checkpoint(
    path: str | os.PathLike, weights: str = "ema", ema: str = "ema"
) -> LoadedCheckpoint:
    """Classify and read `path`; weights: "ema" (default, what DiT reports) or "raw" (the trained
    weights). ema: which EMA of a ditkit checkpoint, "ema" (module.ema_decay) or the name of one of
    its module.extra_ema."""
    if weights not in WEIGHTS:
        raise ValueError(f"weights={weights}: choose ema or raw")
    if ema != "ema" and weights != "ema":
        raise ValueError(f"ema={ema} picks an EMA: drop weights={weights} (or ema=)")
    path = Path(path)
    if path.is_dir():
        raise ValueError(
            f"ckpt={path} is a folder; a sharded (FSDP) checkpoint is consolidated by evaluate.py itself, "
            "anything else must be a .ckpt, .pt or .safetensors file"
        )
    if not path.is_file():
        raise FileNotFoundError(
            f"ckpt={path}: no such file (a ditkit .ckpt, an official DiT .pt or a .safetensors)"
        )
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        if weights == "raw":
            raise ValueError(f"weights=raw: {path} holds one set of weights; drop weights=raw")
        try:
            return LoadedCheckpoint("weights", load_file(path))
        except SafetensorError as err:
            raise ValueError(
                f"ckpt={path} is not a readable safetensors file ({err}); export it again"
            ) from err
    try:
        obj = load_torch_file(path, mmap=True)
    except UNREADABLE as err:
        raise ValueError(
            f"ckpt={path} is not a checkpoint that loads with weights_only=True "
            f"({type(err).__name__}: {err}); "
            "pass a ditkit .ckpt, an official DiT .pt or a .safetensors"
        ) from err
    if not isinstance(obj, dict):
        raise ValueError(f"ckpt={path} holds a {type(obj).__name__}, not a checkpoint dict")
    if "state_dict" in obj and isinstance(obj["state_dict"], dict):
        if "ditkit_config" not in obj:
            raise ValueError(
                f"ckpt={path} is a Lightning checkpoint without `ditkit_config`: not written by "
                "ditkit's train.py, "
                "so the model cannot be rebuilt; export its DiT weights to .safetensors and pass that"
            )
        prefix = "model." if weights == "raw" else "ema." if ema == "ema" else f"extra_ema.{ema}."
        state = _strip(obj["state_dict"], prefix)
        if not state and ema != "ema":
            names = sorted(
                {k.split(".")[1] for k in obj["state_dict"] if k.startswith("extra_ema.")}
            )
            raise ValueError(
                f"ema={ema}: ckpt={path} has no such EMA; choose ema=ema"
                + "".join(f" or ema={n}" for n in names)
                + " (module.extra_ema of the training run)"
            )
        if not state:
            raise ValueError(f"ckpt={path} has no `{prefix}*` weights in its state_dict")
        terms = _term_states(obj["state_dict"], weights == "ema" and ema == "ema")
        return LoadedCheckpoint("ditkit", state, obj["ditkit_config"], terms)
    if ema != "ema":
        raise ValueError(f"ema={ema}: ckpt={path} is not a ditkit checkpoint, it has one EMA")
    if weights == "raw" and "model" not in obj:
        raise ValueError(
            f"weights=raw: {path} holds only EMA weights (official release); drop weights=raw"
        )
    return LoadedCheckpoint("official", _official_state(obj, path, weights))


def _term_states(state: dict[str, torch.Tensor], ema: bool) -> dict[str, dict]:
    """{name: state_dict} of each objective module; the EMA copy where asked and kept."""
    names = {k.split(".")[1] for k in state if k.startswith("objective_modules.")}
    out = {}
    for name in sorted(names):
        shadow = _strip(state, f"ema_objective.{name}.") if ema else {}
        out[name] = shadow or _strip(state, f"objective_modules.{name}.")
    return out


def _official_state(obj: dict, path: Path, weights: str) -> dict[str, torch.Tensor]:
    """The tensors of a released file (bare state_dict) or of a reference-training dict ("ema" /
    "model")."""
    key = "ema" if weights == "ema" else "model"
    if isinstance(obj.get(key), dict):
        obj = obj[key]
    if not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"ckpt={path} holds no state_dict of tensors (keys: {list(obj)[:8]})")
    return obj
