"""python -m ditkit.checkpoints.consolidate RUN/checkpoints/last.ckpt [--output FILE]

Merge a sharded (FSDP2) checkpoint folder into one .ckpt file (default: <folder>.consolidated) that
loads on a single process: evaluate.py, Trainer.fit(ckpt_path=) without FSDP, or torch.load.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from .atomic import atomic_write


def consolidate_checkpoint(folder: str | Path, output: str | Path | None = None) -> Path:
    """Merge a sharded (FSDP2) checkpoint folder into one `.ckpt` file that Trainer.fit(ckpt_path=),
    `torch.load(..., weights_only=True)` and evaluate.py read on a single process.

    output defaults to `<folder>.consolidated`. Returns the path written."""
    from lightning.fabric.utilities.load import _METADATA_FILENAME, _load_distributed_checkpoint

    folder = Path(folder)
    if not (folder / _METADATA_FILENAME).is_file():
        raise FileNotFoundError(
            f"{folder} is not a sharded ditkit/Lightning checkpoint (no {_METADATA_FILENAME} in it)"
        )
    output = Path(output) if output is not None else folder.with_name(folder.name + ".consolidated")
    checkpoint = _load_distributed_checkpoint(folder)
    # ModelParallelStrategy stores optimizers as optimizer_0, optimizer_1, ...; the file format
    # wants a list.
    keys = sorted(
        (k for k in checkpoint if k.startswith("optimizer_")), key=lambda k: int(k.split("_")[1])
    )
    if keys:
        checkpoint["optimizer_states"] = [_index_keyed(checkpoint.pop(k)) for k in keys]
    with atomic_write(output) as f:
        torch.save(checkpoint, f)
    return output


def _index_keyed(optim_state: dict) -> dict:
    """A sharded checkpoint keys optimizer state by parameter name; torch.optim wants positions, in
    the order the names appear in param_groups (the optimizer's own parameter order)."""
    order = [name for group in optim_state["param_groups"] for name in group["params"]]
    index = {name: i for i, name in enumerate(order)}
    groups, start = [], 0
    for group in optim_state["param_groups"]:
        n = len(group["params"])
        groups.append({**group, "params": list(range(start, start + n))})
        start += n
    state = {index[name]: value for name, value in optim_state["state"].items()}
    return {"state": state, "param_groups": groups}


def main() -> None:
    parser = argparse.ArgumentParser(
        description="Merge a sharded (FSDP2) checkpoint folder into one .ckpt file that loads on a "
        "single process (evaluate.py, Trainer.fit(ckpt_path=) without FSDP, torch.load)."
    )
    parser.add_argument(
        "folder", help="a sharded checkpoint folder, e.g. outputs/RUN/checkpoints/last.ckpt"
    )
    parser.add_argument(
        "--output", default=None, help="the file to write (default: <folder>.consolidated)"
    )
    args = parser.parse_args()
    print(consolidate_checkpoint(args.folder, args.output))


if __name__ == "__main__":
    main()
