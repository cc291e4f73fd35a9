"""Auto-resume: which checkpoint of a run folder to continue from.

The newest checkpoint that passes `checkpoint_step` wins; temporary files of interrupted saves
(`*.tmp-*`) are never considered, and truncated or corrupt files are skipped with a warning that
names them. `<name>.old` folders (a sharded checkpoint caught mid-swap) count as checkpoints.
"""

from __future__ import annotations

import warnings
import zipfile
from pathlib import Path

import torch

from .atomic import OLD_SUFFIX

_METADATA = "meta.pt"  # the non-tensor part of a Lightning sharded checkpoint folder
SUFFIX = ".ckpt"


def checkpoint_step(path: str | Path) -> int:
    """Check a checkpoint and return its global step.

    A file is read once end to end to verify the CRC-32 of every record of its zip container
    (torch.load itself checks none, so a flipped bit would load silently), then opened memory-mapped
    with weights_only. A sharded folder must hold DCP's .metadata and a readable meta.pt.
    Raises ValueError naming the file when it is truncated, corrupt, or not a training
    checkpoint."""
    path = Path(path)
    try:
        if path.is_dir():
            meta = path / _METADATA
            if not (path / ".metadata").is_file() or not meta.is_file():
                raise ValueError("sharded checkpoint folder without .metadata / meta.pt")
            ckpt = torch.load(meta, map_location="cpu", weights_only=True)
        else:
            with zipfile.ZipFile(path) as archive:
                bad = archive.testzip()
            if bad is not None:
                raise ValueError(f"record {bad} fails its CRC-32 check")
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - any failure to open means: not usable
        raise ValueError(
            f"checkpoint {path} cannot be read ({type(e).__name__}: {e}); it is truncated or corrupt"
        ) from e
    if not isinstance(ckpt, dict) or "global_step" not in ckpt:
        raise ValueError(f"{path} is not a ditkit training checkpoint (no global_step)")
    return int(ckpt["global_step"])


def find_resume_checkpoint(folder: str | Path) -> Path | None:
    """The newest usable checkpoint in `folder` (a run's checkpoints/), or None when there is none.

    Candidates are `*.ckpt` files/folders and `*.ckpt.old` folders, newest modification time
    first."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    candidates = [
        p
        for p in folder.iterdir()
        if p.name.endswith(SUFFIX) or p.name.endswith(SUFFIX + OLD_SUFFIX)
    ]
    for path in sorted(candidates, key=lambda p: p.stat().st_mtime, reverse=True):
        try:
            checkpoint_step(path)
        except ValueError as e:
            warnings.warn(f"auto-resume skips {e}", stacklevel=2)
            continue
        return path
    return None
