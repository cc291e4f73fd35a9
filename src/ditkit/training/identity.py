"""Run identity: a run folder's readable name, and the fingerprint of what its run trains.

A run lives in ``outputs/<run name>``, and rerunning a command continues the run of its folder. Two
things keep that safe:

* the name puts the overrides that say what a run *is* first (experiment, model, objective, data),
  then the rest; when that gets long the rest becomes a hash, so the leading keys stay readable;
* the folder records a fingerprint of what is trained (``identity.json``: the resolved model,
  objective, optimizer, schedule and seed, and the data's config with the hash of its manifest in
  place of its path). Auto-resume continues only when the fingerprint matches: a command that points
  the same folder at other shards or other settings is refused before any work, naming the keys that
  differ and the two ways on (a new ``run_name=``, or ``resume=force``).

Keys that change nothing trained (`NOT_TRAINED`: loggers, callbacks, paths, worker and device
counts, weights paths) change neither the name nor the fingerprint.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

IDENTITY = "identity.json"
# Top-level config keys that say what a run is, in the order a run name shows them.
LEAD = ("experiment", "model", "objective", "data")
# Overrides that do not change what is trained: each entry matches the key and every key below it.
# (Train longer, on more devices, with other loaders, loggers or callbacks: the same run.)
NOT_TRAINED = (
    "resume",
    "ckpt_path",
    "run_name",
    "threads",
    "trainer.max_steps",
    "trainer.devices",
    "trainer.num_nodes",
    "trainer.log_every_n_steps",
    "trainer.enable_progress_bar",
    "data.root",
    "data.urls",
    "data.manifest",
    "data.num_workers",
    "model.pretrained",
    "paths",
    "logger",
    "callbacks",
    "hydra",
)
# Fingerprinted sections of the resolved config; data's place is its manifest's hash.
TRAINED = ("model", "objective", "optimizer", "lr_schedule", "data", "seed")
MAX_NAME = (
    100  # characters before the non-leading overrides become a hash (names stop at 255 bytes)
)


def _matches(key: str, prefixes: Sequence[str]) -> bool:
    return any(key == p or key.startswith((p + ".", p + "/")) for p in prefixes)


def _override_key(override: str) -> tuple[str, str]:
    """``+callbacks@callbacks.fid=fid`` -> ("callbacks@callbacks.fid", "fid"); ``~a.b`` -> ("a.b", "")."""
    key, _, value = override.partition("=")
    return key.lstrip("+~"), value


def trained_overrides(overrides: Sequence[str]) -> list[tuple[str, str]]:
    """The (key, value) pairs of command-line overrides that change what is trained."""
    pairs = []
    for override in overrides:
        key, value = _override_key(override)
        group, _, package = key.partition("@")  # `group@package`: either part may be excluded
        if not _matches(group, NOT_TRAINED) and not (package and _matches(package, NOT_TRAINED)):
            pairs.append((key, value))
    return pairs


def run_name(overrides: Sequence[str]) -> str:
    """The run folder's name from Hydra's task overrides: ``key-value`` items joined by ``+``, the
    experiment / model / objective / data ones first (``experiment-quickstart+model-unet_s``);
    ``default`` when none changes what is trained. Past `MAX_NAME` characters only the four group
    choices stay and the other overrides become ``rest-<hash>``."""

    def rank(key: str) -> int:
        top = key.split(".")[0].split("/")[0]
        return LEAD.index(top) if top in LEAD else len(LEAD)

    pairs = sorted(trained_overrides(overrides), key=lambda kv: (rank(kv[0]), kv[0]))
    items = [f"{k}-{v}".replace("/", "_") for k, v in pairs]
    name = "+".join(items)
    if len(name) > MAX_NAME:
        lead = [item for (k, _), item in zip(pairs, items, strict=True) if k in LEAD]
        rest = [item for (k, _), item in zip(pairs, items, strict=True) if k not in LEAD]
        digest = hashlib.sha1("+".join(rest).encode()).hexdigest()[:10]
        name = "+".join([*lead, f"rest-{digest}"])
        if len(name) > 2 * MAX_NAME:  # absurd group values (a path as a choice): hash it all
            name = f"{name[:MAX_NAME]}-{hashlib.sha1(name.encode()).hexdigest()[:10]}"
    return name or "default"


def _flatten(value: Any, prefix: str) -> dict[str, Any]:
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: value}


def manifest_digest(manifest: Mapping[str, Any]) -> str:
    """sha256 of a parsed manifest (sample count, shard names and sizes, latent shape, VAE, ...)."""
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()


def fingerprint(config: Mapping[str, Any], manifest: Mapping[str, Any]) -> dict[str, Any]:
    """config: the resolved run config (plain dict); manifest: the training data's parsed manifest.
    Returns ``{"fingerprint": sha256, "trained": {dotted key: value}, "data_source": ...}``: the
    flattened trained sections less `NOT_TRAINED`, plus ``data.manifest_sha256``."""
    trained = {
        k: v
        for section in TRAINED
        if section in config
        for k, v in _flatten(config[section], section).items()
        if not _matches(k, NOT_TRAINED)
    }
    trained["data.manifest_sha256"] = manifest_digest(manifest)
    blob = json.dumps(trained, sort_keys=True, default=str)
    data = config.get("data") or {}
    source = data.get("root") or data.get("urls")
    return {
        "fingerprint": hashlib.sha256(blob.encode()).hexdigest(),
        "trained": json.loads(blob),  # what a reread file holds: lists, not tuples
        "data_source": source if isinstance(source, str | None) else list(source),
    }


def identity_mismatch(run_dir: str | Path, identity: Mapping[str, Any]) -> str | None:
    """None when `run_dir` records the same fingerprint (or none); otherwise the message that
    refuses the resume, naming each differing key as ``key: old -> new``."""
    path = Path(run_dir) / IDENTITY
    if not path.is_file():
        return None
    old = json.loads(path.read_text())
    if old.get("fingerprint") == identity["fingerprint"]:
        return None
    before, after = old.get("trained", {}), identity["trained"]
    missing = object()
    lines = []
    for key in sorted(set(before) | set(after)):
        a, b = before.get(key, missing), after.get(key, missing)
        if a == b:
            continue
        if key == "data.manifest_sha256":
            lines.append(
                f"  data: the shards' manifest differs ({old.get('data_source')} -> "
                f"{identity.get('data_source')}; manifest sha256 {str(a)[:12]} -> {str(b)[:12]})"
            )
        else:
            show = lambda v: "(unset)" if v is missing else repr(v)  # noqa: E731
            lines.append(f"  {key}: {show(a)} -> {show(b)}")
    return (
        f"{run_dir} holds checkpoints of a run that trained something else; this command "
        "differs in:\n" + "\n".join(lines) + "\nEither give this run its own folder with "
        "run_name=<new name>, or continue the old run with these settings anyway with resume=force."
    )


def record_identity(run_dir: str | Path, identity: Mapping[str, Any]) -> None:
    """Write `run_dir`/identity.json (atomically)."""
    from ditkit.checkpoints.atomic import atomic_write

    Path(run_dir).mkdir(parents=True, exist_ok=True)
    with atomic_write(Path(run_dir) / IDENTITY, "w") as f:
        json.dump(dict(identity), f, indent=1, sort_keys=True)


def _has_checkpoint(checkpoint_dir: Path) -> bool:
    return checkpoint_dir.is_dir() and any(
        p.name.endswith((".ckpt", ".ckpt.old")) for p in checkpoint_dir.iterdir()
    )


@contextmanager
def removed_on_failure(
    run_dir: str | Path, checkpoint_dir: str | Path, made_here: bool | None = None
) -> Iterator[None]:
    """A command that fails (or is interrupted) before its run's first checkpoint removes the run
    folder it made, so failed attempts leave no empty folders behind. Never removed: a folder that
    holds a checkpoint when the command fails (a killed worker's group, restarted by torchrun,
    resumes from it), one that held a checkpoint or another command's identity.json when the
    command started, and one that existed before the command (`made_here=False`: train.py knows it
    from the run lock, taken before Hydra makes the folder; None: unknown). Only the global rank 0
    removes anything."""
    run_dir, checkpoint_dir = Path(run_dir), Path(checkpoint_dir)
    ours = (
        made_here is not False
        and not (run_dir / IDENTITY).exists()
        and not _has_checkpoint(checkpoint_dir)
    )
    try:
        yield
    except BaseException:
        from lightning.pytorch.utilities import rank_zero_only

        if ours and rank_zero_only.rank == 0 and not _has_checkpoint(checkpoint_dir):
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
