"""FSDP2 sharding, torch.compile and consolidation of sharded checkpoints.

FSDP2 runs through Lightning's `ModelParallelStrategy` (`FSDP2Strategy`, conf/strategy/fsdp.yaml), which hands
`DiffusionModule.configure_model` a device mesh; `shard_blocks` applies `fully_shard` per
transformer block and then to the root (the torchtitan recipe: each block's parameters are
all-gathered just before it runs and freed after). Sharded checkpoints are folders written with
torch.distributed.checkpoint; they reload on any world size, and `consolidate_checkpoint` turns one
into a single ordinary `.ckpt` file (for one process, evaluate.py, or export).
"""

from pathlib import Path

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, fully_shard


class FSDP2Strategy(ModelParallelStrategy):
    """Lightning's ModelParallelStrategy as pure FSDP2: one data-parallel mesh over every rank, no tensor
    parallelism. (Its "auto" data-parallel size is the node count, which assumes TP inside a node.)

    save_distributed_checkpoint: True writes a folder of per-rank shards (fast, any world size can
    reload it); False gathers a single file on rank 0."""

    def __init__(self, save_distributed_checkpoint: bool = True, **kwargs):
        super().__init__(
            data_parallel_size="auto",
            tensor_parallel_size=1,
            save_distributed_checkpoint=save_distributed_checkpoint,
            **kwargs,
        )

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()


def shard_blocks(model: nn.Module, mesh: DeviceMesh) -> None:
    """fully_shard every module of `model.blocks`, then the root (embedders and final layer)."""
    if not hasattr(model, "blocks"):
        raise TypeError(
            f"{type(model).__name__} has no `blocks`; FSDP2 sharding needs the list of transformer blocks"
        )
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)


def reshard(model: nn.Module) -> None:
    """Free the gathered parameters of every FSDP2 unit of `model` (a no-op for unsharded models).

    FSDP2 keeps the root's parameters gathered after a forward, expecting a backward; a forward without
    one (sampling with the EMA copy) would leave full tensors where the EMA update expects shards."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def compile_blocks(model: nn.Module) -> None:
    """torch.compile the forward of each transformer block. Compiling `forward` (not the module's call)
    keeps FSDP2's all-gather hooks and activation checkpointing outside the compiled graph, and keeps the
    parameter names, so checkpoints of compiled and eager runs are interchangeable."""
    for block in model.blocks:
        block.forward = torch.compile(block.forward)


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
    # ModelParallelStrategy stores optimizers as optimizer_0, optimizer_1, ...; the file format wants a list.
    keys = sorted(
        (k for k in checkpoint if k.startswith("optimizer_")), key=lambda k: int(k.split("_")[1])
    )
    if keys:
        checkpoint["optimizer_states"] = [_index_keyed(checkpoint.pop(k)) for k in keys]
    tmp = output.with_name(output.name + ".tmp")
    torch.save(checkpoint, tmp)
    tmp.replace(output)
    return output


def _index_keyed(optim_state: dict) -> dict:
    """A sharded checkpoint keys optimizer state by parameter name; torch.optim wants positions, in the
    order the names appear in param_groups (the optimizer's own parameter order)."""
    order = [name for group in optim_state["param_groups"] for name in group["params"]]
    index = {name: i for i, name in enumerate(order)}
    groups, start = [], 0
    for group in optim_state["param_groups"]:
        n = len(group["params"])
        groups.append({**group, "params": list(range(start, start + n))})
        start += n
    state = {index[name]: value for name, value in optim_state["state"].items()}
    return {"state": state, "param_groups": groups}
