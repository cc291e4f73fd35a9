"""What a shard set's manifest says about the data keys (`data.latent_size`, `latent_channels`,
`image_size`, `num_classes`, and the text embeddings' `context_len`, `context_dim`, `pooled_dim`):
fill the ones a user did not set, and check the ones they did, all mismatches in one error."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from ditkit.data.format import DataFormatError

SHAPE_KEYS = ("latent_channels", "latent_size", "image_size", "num_classes")
TEXT_KEYS = ("context_len", "context_dim", "pooled_dim")


def manifest_values(manifest: Mapping[str, Any], text: bool = True) -> dict[str, Any]:
    """The data keys the manifest knows. latent_shape is (C, H, W): channels C, size H; with
    ``text`` and a captioned set, also its text-embedding shape."""
    c, h, _ = manifest["latent_shape"]
    values = {
        "latent_channels": int(c),
        "latent_size": int(h),
        "image_size": int(manifest["image_size"]),
        "num_classes": int(manifest["num_classes"]),
    }
    if text and manifest.get("text"):
        values.update({k: int(manifest["text"][k]) for k in TEXT_KEYS})
    return values


def check_against_manifest(
    config: Mapping[str, Any], manifest: Mapping[str, Any], key: str = "data"
) -> None:
    """Raise one `DataFormatError` listing every key of ``config`` (a subset of the data keys) that
    differs from the manifest, each with the override that fixes it."""
    known = manifest_values(manifest)
    wrong = [k for k, v in config.items() if k in known and v is not None and v != known[k]]
    if wrong:
        lines = "\n".join(
            f"  {key}.{k}={config[k]}, but the shards have {known[k]}: pass {key}.{k}={known[k]} "
            "(or drop the override: the manifest fills it in)"
            for k in wrong
        )
        c, h, w = manifest["latent_shape"]
        raise DataFormatError(
            f"The shards (latents [{c}, {h}, {w}] (C, H, W)) do not fit the config:\n{lines}\n"
            "or point at shards made for these sizes."
        )


def fill_from_manifest(
    data: Mapping[str, Any], manifest: Mapping[str, Any], explicit: Iterable[str], text: bool
) -> dict[str, Any]:
    """data: the resolved data config; explicit: the data keys set on the command line (checked,
    never replaced); text: whether the model takes text embeddings (then a captioned set's shape is
    filled in too). Returns ``{key: manifest value}`` for the other keys that differ from it."""
    explicit = set(explicit)
    known = manifest_values(manifest, text=text or any(k in explicit for k in TEXT_KEYS))
    check_against_manifest({k: data.get(k) for k in explicit if k in known}, manifest)
    return {k: v for k, v in known.items() if k not in explicit and data.get(k) != v}
