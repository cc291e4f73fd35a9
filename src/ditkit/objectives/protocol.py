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
from .terms import Term, TermInputs, capture_block_outputs, check_depths, joint_sampling_state

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
        joint = [key for key, term in self.terms.items() if term.adds_joint_tokens]
        if len(joint) > 1:
            raise ValueError(f"objective terms {joint} all add joint tokens; choose one")

    def joint_term(self) -> tuple[str, Term] | None:
        """(name, term) of the term that adds joint tokens (REG), or None."""
        return next(((k, t) for k, t in self.terms.items() if t.adds_joint_tokens), None)

    def check_joint_tokens(self, key: str, term: Term) -> None:
        """Raise unless this objective denoises `term`'s joint tokens (overridden where it can)."""
        raise ValueError(
            f"objective term {key!r} ({type(term).__name__}) denoises extra tokens with the image, "
            f"which objective={self.name} does not do: use objective=flow (REG is SiT-based)"
        )

    def bind(self, model: nn.Module) -> None:
        """Build the terms' parameters for `model` (once, before the optimizer is built)."""
        joint = self.joint_term()
        if joint is not None:
            self.check_joint_tokens(*joint)
        check_depths(model, self.terms)
        for term in self.terms.values():
            term.bind(model)

    def term_depths(self) -> tuple[int, ...]:
        """The block outputs the terms read, sorted."""
        return tuple(sorted({d for term in self.terms.values() for d in term.depths}))

    def trainable_modules(self) -> dict[str, nn.Module]:
        return dict(self.terms)

    def forward_model(
        self, model: nn.Module, x: torch.Tensor, t: torch.Tensor, condition: dict
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """model(x, t, **condition), and the block outputs the terms read (none without terms)."""
        depths = self.term_depths()
        if not depths:
            return model(x, t, **condition), {}
        with capture_block_outputs(model, depths) as hidden:
            output = model(x, t, **condition)
        return output, dict(hidden)

    def add_terms(self, losses: dict, inputs: TermInputs) -> dict:
        """losses["loss"] += weight * value of each term; each value is also its own part (a term
        returning {suffix: value} gives the parts `key` and `key_suffix`, weighted by
        term.part_weights())."""
        for key, term in self.terms.items():
            value = term(inputs)
            parts = value if isinstance(value, Mapping) else {"": value}
            weights = term.part_weights() if isinstance(value, Mapping) else {"": term.weight}
            for suffix, part in parts.items():
                losses[f"{key}_{suffix}" if suffix else key] = part
                losses["loss"] = losses["loss"] + weights[suffix] * part
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
        terms: Mapping[str, Term] | None = None,
        **options: Any,
    ) -> torch.Tensor:
        """x_0: (N, C, H, W) from noise x_T: (N, C, H, W) with a registered sampler (default
        `default_sampler`) and its default steps; options are the sampler's own (e.g. eta).
        guidance_interval is in the objective's time (ddpm: original timesteps; flow: t in [0,
        1]). terms: stand-ins for the objective's terms of the same names (the training module's
        EMA copies). A joint-token term (REG) is integrated with the image: its tokens ride in
        extra channels of the state (terms.JointTokenModel), starting from unit noise drawn from
        the global RNG, and are dropped from the result."""
        spec, steps, options = resolve(
            {"name": sampler or self.default_sampler, "steps": steps, "options": options},
            self.name,
            "evaluate",
        )
        channels = x_T.shape[1]
        joint = self.joint_term()
        if joint is not None:
            term = (terms or {}).get(joint[0], joint[1])
            model, x_T = joint_sampling_state(model, term, x_T)
            channels = model.channels
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
        )[:, :channels]
