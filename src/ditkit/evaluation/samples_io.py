"""Samples on disk: per-batch parts (what makes an interrupted run resumable), the ADM `.npz` and a
grid PNG.

A part `parts/part-<start>.npz` holds one batch of the global plan: `images` (n, H, W, 3) uint8,
`labels` (n,) int64, and the Inception `pool` (n, 2048) / `logits` (n, 1008) float32 features, so a
resumed run needs neither the sampler nor Inception for what was done. `parts/plan.json` records the
settings the parts were made with; other settings in the same folder are refused rather than mixed.
"""

from __future__ import annotations

import json
import math
import zipfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ditkit.checkpoints.atomic import atomic_write


class PartStore:
    """The parts folder of one evaluation run. `plan`: JSON-able settings that define the
    samples."""

    def __init__(self, root: str | Path, plan: dict):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        plan_file = self.root / "plan.json"
        if plan_file.exists():
            old = json.loads(plan_file.read_text())
            if old != plan:
                diff = {
                    k: (old.get(k), plan.get(k))
                    for k in set(old) | set(plan)
                    if old.get(k) != plan.get(k)
                }
                raise ValueError(
                    f"{self.root} holds samples made with other settings {diff} (was, now); "
                    "use a new hydra.run.dir or delete that folder"
                )
        else:
            with atomic_write(plan_file, "w") as f:
                json.dump(plan, f, indent=1, sort_keys=True)

    def path(self, start: int) -> Path:
        return self.root / f"part-{start:09d}.npz"

    def load(self, start: int, count: int) -> dict[str, np.ndarray] | None:
        """The part that begins at global index `start` if it is complete and readable, else
        None."""
        path = self.path(start)
        if not path.exists():
            return None
        try:
            with np.load(path) as z:
                part = {k: z[k] for k in ("images", "labels", "pool", "logits")}
        except Exception:
            return None  # damaged: sample it again
        return part if len(part["labels"]) == count else None

    def save(
        self,
        start: int,
        images: np.ndarray,
        labels: np.ndarray,
        pool: np.ndarray,
        logits: np.ndarray,
    ) -> None:
        """images: (n, H, W, 3) uint8; labels: (n,); pool: (n, 2048); logits: (n, 1008)."""
        # A kill mid-write leaves a temporary file, never a truncated part.
        with atomic_write(self.path(start)) as f:
            np.savez(f, images=images, labels=labels, pool=pool, logits=logits)


def write_adm_npz(path: str | Path, store: PartStore, starts: list[int]) -> None:
    """Concatenate the parts at `starts` (in order) into an ADM-suite `.npz`: arr_0 (N, H, W, 3)
    uint8, arr_1 (N,) labels.

    The images are streamed into the zip member so that 50,000 of them never sit in memory at once.
    """
    shapes, labels = [], []
    for s in starts:
        with np.load(store.path(s)) as z:
            shapes.append(z["images"].shape)
            labels.append(z["labels"])
    n = sum(sh[0] for sh in shapes)
    h, w, c = shapes[0][1:]
    with (
        atomic_write(path) as out,
        zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf,
    ):
        with zf.open("arr_0.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_2_0(
                f, {"descr": "|u1", "fortran_order": False, "shape": (n, h, w, c)}
            )
            for s in starts:
                with np.load(store.path(s)) as z:
                    f.write(np.ascontiguousarray(z["images"], dtype=np.uint8).tobytes())
        with zf.open("arr_1.npy", "w") as f:
            np.lib.format.write_array(f, np.concatenate(labels).astype(np.int64))


def image_grid(images: torch.Tensor, nrow: int | None = None) -> np.ndarray:
    """images: (N, 3, H, W) uint8 -> one (rows*H, nrow*W, 3) uint8 array, filled row by row (blank
    cells black)."""
    n, c, h, w = images.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    grid = torch.zeros(rows * h, nrow * w, c, dtype=torch.uint8)
    for i, img in enumerate(images.cpu()):
        r, col = divmod(i, nrow)
        grid[r * h : (r + 1) * h, col * w : (col + 1) * w] = img.permute(1, 2, 0)
    return grid.numpy()


def save_grid(path: str | Path, images: torch.Tensor) -> None:
    """images: (N, 3, H, W) uint8 -> a PNG grid."""
    with atomic_write(path) as f:
        Image.fromarray(image_grid(images)).save(f, format="PNG")
