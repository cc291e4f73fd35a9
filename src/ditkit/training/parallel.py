"""Parallelism, compile and activation checkpointing, applied to a backbone from outside (the
model is plain PyTorch; each of these works on its `blocks`, so DiT, MMDiT and the U-Net alike).

FSDP2 runs through Lightning's `ModelParallelStrategy` (`FSDP2Strategy`, conf/strategy/fsdp.yaml),
which hands `DiffusionModule.configure_model` a device mesh (`HSDPStrategy`, conf/strategy/hsdp.yaml:
a 2-D one, sharded inside a node and replicated across nodes); `shard_blocks` applies `fully_shard`
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


class HSDPStrategy(ModelParallelStrategy):
    """Hybrid sharding (HSDP): FSDP2 sharding inside a group of `shard_size` ranks (a node), plain
    replication across the `replicate_size` groups, on a 2-D device mesh ("replicate", "shard").
    Parameter all-gathers and gradient reduce-scatters stay on the fast links inside a node; only
    one gradient all-reduce per shard crosses nodes (the PyTorch FSDP2 HSDP recipe:
    `fully_shard(module, mesh=<2-D mesh>)`).

    replicate_size: the number of replica groups; default the node count (trainer.num_nodes).
    Checkpoints are DCP folders like FSDP2's, and reload on any mesh (strategy=fsdp on one node).
    """

    def __init__(self, replicate_size: int | None = None, **kwargs):
        super().__init__(
            data_parallel_size="auto",
            tensor_parallel_size=1,
            save_distributed_checkpoint=True,
            **kwargs,
        )
        self.replicate_size = replicate_size

    def setup_environment(self) -> None:
        from torch.distributed.device_mesh import init_device_mesh

        # ModelParallelStrategy's own mesh is (data_parallel, tensor_parallel); skip it, keep the
        # process-group set-up.
        super(ModelParallelStrategy, self).setup_environment()
        self._setup_distributed()
        replicas = self.replicate_size or self.num_nodes
        if replicas < 1 or self.world_size % replicas:
            raise ValueError(
                f"trainer.strategy.replicate_size={replicas} must divide the world size "
                f"({self.world_size} = trainer.num_nodes x trainer.devices)"
            )
        self._device_mesh = init_device_mesh(
            self.root_device.type,
            (replicas, self.world_size // replicas),
            mesh_dim_names=("replicate", "shard"),
        )
        self.lightning_module._device_mesh = self._device_mesh


def fsdp_mesh(device_mesh: DeviceMesh) -> DeviceMesh:
    """The mesh fully_shard takes: FSDP2's 1-D data-parallel mesh, or HSDP's 2-D one."""
    names = device_mesh.mesh_dim_names or ()
    return device_mesh if "replicate" in names else device_mesh["data_parallel"]


def replicas(device_mesh: DeviceMesh | None) -> int:
    """How many copies of each shard the ranks hold: HSDP's replica groups, else 1."""
    names = (device_mesh.mesh_dim_names or ()) if device_mesh is not None else ()
    return device_mesh["replicate"].size() if "replicate" in names else 1


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
