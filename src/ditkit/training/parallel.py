"""Parallelism, compile and activation checkpointing, applied to a backbone from outside (the
model is plain PyTorch; each of these works on its `blocks`, so DiT, MMDiT and the U-Net alike).

FSDP2 runs through Lightning's `ModelParallelStrategy` (`FSDP2Strategy`, conf/strategy/fsdp.yaml),
which hands `DiffusionModule.configure_model` a device mesh; `shard_blocks` applies `fully_shard`
per block and then to the root (the torchtitan recipe: each block's parameters are all-gathered just
before it runs and freed after). Sharded checkpoints are folders written with
torch.distributed.checkpoint; they reload on any world size, and
`ditkit.checkpoints.consolidate_checkpoint` turns one into a single ordinary `.ckpt` file.
"""

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.utils.checkpoint import checkpoint


class FSDP2Strategy(ModelParallelStrategy):
    """Lightning's ModelParallelStrategy as pure FSDP2: one data-parallel mesh over every rank, no
    tensor parallelism. (Its "auto" data-parallel size is the node count, which assumes TP inside a
    node.)

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
            f"{type(model).__name__} has no `blocks`; FSDP2 sharding needs the list of its blocks"
        )
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)


def reshard(model: nn.Module) -> None:
    """Free the gathered parameters of every FSDP2 unit of `model` (a no-op for unsharded models).

    FSDP2 keeps the root's parameters gathered after a forward, expecting a backward; a forward
    without one (sampling with the EMA copy) would leave full tensors where the EMA update expects
    shards."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def compile_blocks(model: nn.Module) -> None:
    """torch.compile the forward of each transformer block. Compiling `forward` (not the module's
    call) keeps FSDP2's all-gather hooks and activation checkpointing outside the compiled graph,
    and keeps the parameter names, so checkpoints of compiled and eager runs are interchangeable."""
    for block in model.blocks:
        block.forward = torch.compile(block.forward)


def checkpoint_blocks(model: nn.Module) -> None:
    """Activation checkpointing per block (Chen et al. 2016): each block's forward keeps only its
    inputs for the backward and recomputes the rest. Non-reentrant `torch.utils.checkpoint`, wrapped
    around the block's (possibly compiled) `forward`, inside FSDP2's hooks: FSDP2 gathers the
    parameters again before the recomputation. Forwards without grad (sampling) run plain.
    Parameter names are unchanged, so checkpoints of runs with and without it are
    interchangeable."""
    for block in model.blocks:
        block.forward = _checkpointed(block.forward)


def _checkpointed(forward):
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run
