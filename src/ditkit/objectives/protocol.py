"""The contract an objective meets, and the base both objectives share.

An objective turns a batch into per-sample losses and noise into samples; it knows nothing of
Lightning. The training module hands it the batch dict untouched: `training_losses(model, batch)`
reads the fields it needs (`x`, the backbone's condition keys, and whatever its terms read).
docs/extending.md walks through adding an objective term and a sampler.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from .guidance import Guidance
from .samplers import resolve
from .terms import Term, TermInputs, capture_block_outputs, check_depths

REQUIRED = {
    "name": "the objective's registry name (`ddpm`, `flow`): samplers are registered for it",
    "training_losses": "training_losses(model, batch) -> {'loss': (N,), part: (N,), ...}",
    "sample": "sample(model, x_T, model_kwargs, sampler=, steps=, cfg_scale=, ...) -> x_0",
    "bind": "bind(model): build the parameters the objective owns for this backbone",
    "trainable_modules": "trainable_modules() -> {name: nn.Module} it owns (may be empty)",
}


@runtime_checkable
class Objective(Protocol):
    name: str

    def training_losses(self, model: nn.Module, batch: Mapping[str, Any]) -> dict:
        """Per-sample losses (N,): `loss` (what is trained) and its parts, each logged."""
        ...

    def sample(self, model: nn.Module, x_T: torch.Tensor, model_kwargs: dict | None = None, **kw):
        """x_0: (N, C, H, W) from noise x_T: (N, C, H, W)."""
        ...

    def bind(self, model: nn.Module) -> None: ...

    def trainable_modules(self) -> dict[str, nn.Module]: ...


def check_objective(objective: object, where: str = "objective") -> None:
    """Raise TypeError naming every part of the Objective contract that `objective` lacks."""
    missing = [name for name in REQUIRED if not hasattr(objective, name)]
    if missing:
        lines = "\n".join(f"  {name}: {REQUIRED[name]}" for name in missing)
        raise TypeError(
            f"{where} ({type(objective).__name__}) does not meet the Objective contract "
            f"(ditkit.objectives.Objective, docs/extending.md); it lacks:\n{lines}"
        )


def model_inputs(model: nn.Module, batch: Mapping[str, Any]) -> tuple[torch.Tensor, dict]:
    """(x, condition) for `model` from a batch dict: `x` and the fields in
    `model.condition_keys`."""
    if not isinstance(batch, Mapping):
        raise TypeError(
            f"batches are dicts of named fields ({{'x': latents, 'y': labels}} or text fields), got "
            f"a {type(batch).__name__}: use ditkit.data.LatentShardsDataModule, or "
            "ditkit.data.TensorDict for tensors in memory"
        )
    keys = tuple(getattr(model, "condition_keys", ()))
    missing = [k for k in ("x", *keys) if k not in batch]
    if missing:
        raise KeyError(
            f"the batch has fields {sorted(batch)}, but {type(model).__name__} needs {missing}: "
            "text backbones (condition context, pooled) train on captioned shards, class-conditional "
            "ones on labelled shards"
        )
    return batch["x"], {k: batch[k] for k in keys}


class DiffusionObjective:
    """What GaussianDiffusion and RectifiedFlow share: terms with their own parameters, the model
    call that records the block outputs the terms read, and sampling through the registry.

    terms: {name: Term}; each adds weight * value to the loss and is logged as `name`."""

    name = ""
    default_sampler = ""  # the sampler `sample()` uses when none is named

    def __init__(self, terms: Mapping[str, Term] | None = None) -> None:
        self.terms: dict[str, Term] = dict(terms or {})
        for key, term in self.terms.items():
            if not isinstance(term, Term):
                raise TypeError(f"objective term {key!r} is a {type(term).__name__}, not a Term")
            if key in ("loss", "mse", "vb", "cos"):
                raise ValueError(f"objective term name {key!r} is taken by a loss part")

    def bind(self, model: nn.Module) -> None:
        """Build the terms' parameters for `model` (once, before the optimizer is built)."""
        check_depths(model, self.terms)
        for term in self.terms.values():
            term.bind(model)

    def trainable_modules(self) -> dict[str, nn.Module]:
        return dict(self.terms)

    def forward_model(
        self, model: nn.Module, x: torch.Tensor, t: torch.Tensor, condition: dict
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """model(x, t, **condition), and the block outputs the terms read (none without terms)."""
        depths = tuple(sorted({d for term in self.terms.values() for d in term.depths}))
        if not depths:
            return model(x, t, **condition), {}
        with capture_block_outputs(model, depths) as hidden:
            output = model(x, t, **condition)
        return output, dict(hidden)

    def add_terms(self, losses: dict, inputs: TermInputs) -> dict:
        """losses["loss"] += weight * value of each term; each value is also its own part."""
        for key, term in self.terms.items():
            value = term(inputs)
            losses[key] = value
            losses["loss"] = losses["loss"] + term.weight * value
        return losses

    def check_sampler(self, sampler: str) -> None:
        """Raise a clear error unless `sampler` is registered for this objective."""
        resolve(sampler, self.name, "evaluate")

    @torch.no_grad()
    def sample(
        self,
        model: nn.Module,
        x_T: torch.Tensor,
        model_kwargs: dict | None = None,
        sampler: str | None = None,
        steps: int | str | None = None,
        cfg_scale: float = 1.0,
        guidance_channels: int | None = None,
        guidance_interval: tuple[float, float] | None = None,
        progress: bool = False,
        **options: Any,
    ) -> torch.Tensor:
        """x_0: (N, C, H, W) from noise x_T: (N, C, H, W) with a registered sampler (default
        `default_sampler`) and its default steps; options are the sampler's own (e.g. eta).
        guidance_interval is in the objective's time (ddpm: original timesteps; flow: t in [0,
        1])."""
        spec, steps, options = resolve(
            {"name": sampler or self.default_sampler, "steps": steps, "options": options},
            self.name,
            "evaluate",
        )
        guidance = Guidance.build(
            model, model_kwargs, cfg_scale, guidance_channels, guidance_interval
        )
        return spec.run(
            self,
            model,
            x_T,
            model_kwargs,
            steps=steps,
            guidance=guidance,
            progress=progress,
            **options,
        )
