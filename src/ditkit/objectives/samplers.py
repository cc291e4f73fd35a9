"""The sampler registry: every sampler is defined once, with the objective it serves, its default
step count and its options. `objective.sample(...)`, evaluate.py's `sampler=` group, the sample-grid
and FID callbacks and the benchmarks all read this table; nothing else names samplers.

A sampler is a function `run(objective, model, x_T, *, steps, guidance, progress, **options) -> x_0`
registered with `@register_sampler(...)` beside the objective it integrates (gaussian.py, flow.py).
`guidance` is the resolved `Guidance`; the function calls `guidance(model, x, t, model_kwargs, time,
C)` wherever it needs the model. docs/extending.md walks through adding one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class SamplerSpec:
    """name: what `sampler=` takes; objective: the `Objective.name` it serves; default_steps: steps
    when none are given (an int, or a respacing string for DDPM); options: keyword options with
    their defaults; nfe_per_step: model calls per step (a guided call is one batch of 2N); run: the
    sampler."""

    name: str
    objective: str
    default_steps: int | str
    run: Callable[..., Any]
    options: Mapping[str, Any] = field(default_factory=dict)
    nfe_per_step: int = 1
    description: str = ""


SAMPLERS: dict[str, SamplerSpec] = {}

# Which registered sampler each objective uses when none is named: `evaluate` reproduces its papers'
# FID protocol (DiT: 250 ancestral DDPM steps; SiT: 250 Euler-Maruyama steps), `preview` is a cheap
# deterministic one for the training-time grids and FID.
DEFAULTS: dict[str, dict[str, str]] = {
    "ddpm": {"evaluate": "ddpm", "preview": "ddim"},
    "flow": {"evaluate": "sde", "preview": "euler"},
    "meanflow": {"evaluate": "meanflow1", "preview": "meanflow1"},
}
PURPOSES = ("evaluate", "preview")


def register_sampler(
    name: str,
    objective: str,
    default_steps: int | str,
    nfe_per_step: int = 1,
    description: str = "",
    **options: Any,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: add `run` to the registry under `name` (a name can be registered once)."""

    def add(run: Callable[..., Any]) -> Callable[..., Any]:
        if name in SAMPLERS:
            raise ValueError(f"sampler {name!r} is registered twice")
        SAMPLERS[name] = SamplerSpec(
            name, objective, default_steps, run, dict(options), nfe_per_step, description
        )
        return run

    return add


def samplers_of(objective: str) -> tuple[str, ...]:
    """The sampler names that serve `objective`, in registration order."""
    return tuple(name for name, spec in SAMPLERS.items() if spec.objective == objective)


def all_samplers() -> tuple[str, ...]:
    """Every registered sampler, grouped by objective (in the order of DEFAULTS, then any other)."""
    objectives = [
        *DEFAULTS,
        *(s.objective for s in SAMPLERS.values() if s.objective not in DEFAULTS),
    ]
    return tuple(name for obj in dict.fromkeys(objectives) for name in samplers_of(obj))


def get_sampler(name: str, objective: str | None = None) -> SamplerSpec:
    """The spec of `name`; with `objective`, refuse a sampler of another objective. Errors name the
    valid choices."""
    spec = SAMPLERS.get(name)
    if spec is None:
        known = ", ".join(samplers_of(objective)) if objective else ", ".join(SAMPLERS)
        scope = f"objective={objective} supports" if objective else "registered:"
        raise ValueError(f"unknown sampler {name!r}; {scope} sampler={known}")
    if objective is not None and spec.objective != objective:
        raise ValueError(
            f"sampler={name} belongs to objective={spec.objective}, but the objective is "
            f"{objective}; choose one of sampler={', '.join(samplers_of(objective))} "
            f"(or objective={spec.objective})"
        )
    return spec


def default_sampler(objective: str, purpose: str) -> str:
    """The sampler `objective` uses for `purpose` ("evaluate" or "preview") when none is named."""
    if purpose not in PURPOSES:
        raise ValueError(f"purpose={purpose!r}; choose one of {PURPOSES}")
    if objective not in DEFAULTS:
        raise ValueError(f"objective {objective!r} has no default samplers; name one with sampler=")
    return DEFAULTS[objective][purpose]


def resolve(
    sampler: str | Mapping[str, Any] | None, objective: str, purpose: str
) -> tuple[SamplerSpec, int | str, dict[str, Any]]:
    """(spec, steps, options) of a sampler setting, the one config shape used everywhere:
    None, a name, or a mapping {name, steps, options} (any of them null = the default).
    Unknown option names are refused, naming the valid ones."""
    if sampler is None or isinstance(sampler, str):
        sampler = {"name": sampler}
    unknown = set(sampler) - {"name", "steps", "options"}
    if unknown:
        raise ValueError(
            f"sampler settings take name, steps and options; unknown keys {sorted(unknown)}"
        )
    name = sampler.get("name") or default_sampler(objective, purpose)
    spec = get_sampler(name, objective)
    steps = sampler.get("steps")
    if steps is None:
        steps = spec.default_steps
    options = {**spec.options, **dict(sampler.get("options") or {})}
    bad = set(options) - set(spec.options)
    if bad:
        valid = ", ".join(spec.options) or "none"
        raise ValueError(f"sampler={name} has no option {sorted(bad)}; its options: {valid}")
    return spec, steps, options


def config_node(spec: SamplerSpec) -> dict[str, Any]:
    """The config a `sampler=NAME` choice composes to: {name, steps, options}."""
    return {"name": spec.name, "steps": spec.default_steps, "options": dict(spec.options)}


def register_configs() -> None:
    """Make every registered sampler a choice of Hydra's `sampler` group (evaluate.py's
    `sampler=NAME sampler.steps=N sampler.options.eta=...`), from this table alone."""
    from hydra.core.config_store import ConfigStore

    from . import flow, gaussian, meanflow, solvers  # noqa: F401 - their samplers register on import

    store = ConfigStore.instance()
    for spec in SAMPLERS.values():
        store.store(group="sampler", name=spec.name, node=config_node(spec))
