"""Which sampler belongs to which objective, and the early check that refuses a mismatch."""

from __future__ import annotations

SAMPLER_OBJECTIVE = {"ddpm": "ddpm", "ddim": "ddpm", "euler": "flow", "heun": "flow", "sde": "flow"}


def samplers_of(objective: str) -> tuple[str, ...]:
    """The sampler names of objective `objective` ("ddpm" or "flow")."""
    return tuple(s for s, o in SAMPLER_OBJECTIVE.items() if o == objective)


def check_sampler(objective: str, sampler: str, sampler_objective: str | None = None) -> None:
    """Raise ValueError naming the valid samplers unless `sampler` works with `objective`.

    sampler_objective: the objective a sampler config declares (conf/sampler/*.yaml), checked too.
    """
    valid = ", ".join(samplers_of(objective))
    owner = SAMPLER_OBJECTIVE.get(sampler)
    if owner is None:
        raise ValueError(
            f"unknown sampler {sampler!r}; objective={objective} supports sampler={valid}"
        )
    if sampler_objective is not None and sampler_objective != owner:
        raise ValueError(
            f"the sampler config for {sampler!r} declares objective={sampler_objective}, "
            f"but sampler={sampler} belongs to objective={owner}; fix the config's `objective` key"
        )
    if owner != objective:
        raise ValueError(
            f"sampler={sampler} belongs to objective={owner}, but the objective is {objective}; "
            f"choose one of sampler={valid} (or objective={owner})"
        )
