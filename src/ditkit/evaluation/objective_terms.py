"""The objective a checkpoint samples with: its training config, less the terms sampling does not
need (probes, REPA's projector), with the ones it does (REG's class-token embedding and head) built
without their training-only parts and loaded from the checkpoint."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn


def sampling_objective(
    objective_cfg: Mapping | DictConfig,
    model: nn.Module,
    term_states: Mapping[str, Mapping[str, torch.Tensor]],
    where: str = "ckpt",
):
    """Instantiate `objective_cfg` for sampling `model`: each term whose class sets
    `used_in_sampling` is kept, configured by its `sampling_overrides(state)`, bound to `model`
    and loaded (strict) from `term_states[name]`; the others are dropped."""
    cfg = OmegaConf.create(
        OmegaConf.to_container(objective_cfg)
        if isinstance(objective_cfg, DictConfig)
        else dict(objective_cfg)
    )
    if "terms" not in cfg:
        return instantiate(cfg)
    kept = {}
    for name, term_cfg in (cfg.terms or {}).items():
        cls = get_class(term_cfg["_target_"])
        if not getattr(cls, "used_in_sampling", False):
            continue  # training-only losses (probes, projectors)
        if name not in term_states:
            raise ValueError(
                f"{where}: the objective's term {name!r} ({cls.__name__}) is needed to sample, "
                "but the checkpoint has no `objective_modules." + name + ".*` weights"
            )
        for key, value in cls.sampling_overrides(term_states[name]).items():
            term_cfg[key] = value
        kept[name] = term_cfg
    cfg.terms = kept
    objective = instantiate(cfg)
    if kept:
        objective.bind(model)
        for name, term in objective.terms.items():
            term.load_state_dict(term_states[name], strict=True)
            term.eval()
    return objective
