"""The training stall per save of a sharded (FSDP2) checkpoint folder: synchronous against
`callbacks.checkpoint.async_save=true` (DCP's async_save), on `world_size` gloo processes.

    python benchmarks/memory.py measure=sharded_save model=dit_b world_size=2 save_dir=/tmp/w14

Run by benchmarks/memory.py (measure=sharded_save). Each rank builds the model and its EMA, shards
both with FSDP2 (`shard_blocks`, as DiffusionModule does), takes one AdamW step so that the moments
exist, and takes the checkpoint's DCP part as Lightning's ModelParallelStrategy does
(`get_model_state_dict` / `get_optimizer_state_dict`, sharded, cpu_offload=True). Then `repeats`
saves per variant, each through the code path of AtomicModelCheckpoint:

- sync: the shards and meta.pt into the temporary folder (Lightning's
  `_distributed_checkpoint_save`: `dcp.save`), the ranks' agreement, rank 0's `replace_folder`. The
  step waits for all of it.
- async: meta.pt, the agreement, `ShardedAsyncWriter.submit` (DCP's async_save: a host copy of the
  shards, then `save` in a thread). The step waits for that; the write goes on in the background;
  the commit (agreement, `replace_folder`) happens at the next save. Its cost, measured once the
  write has finished, is what the next save waits for when the save interval is longer than the
  write.

Reports, per variant, the slowest rank's seconds: the stall (median over repeats), until written,
and the commit.
"""

import os
import socket
import statistics
import tempfile
import time
from pathlib import Path

import torch


class _Strategy:
    """The two strategy calls the commit makes (Lightning's reduce_boolean_decision: an all-reduce
    on the default group)."""

    def __init__(self, rank: int):
        self.is_global_zero = rank == 0

    def reduce_boolean_decision(self, decision: bool, all: bool = True) -> bool:
        import torch.distributed as dist

        flag = torch.tensor(int(decision))
        dist.all_reduce(flag)
        return bool(flag.item() == dist.get_world_size())


def _state(args: dict):
    """This rank's DCP part of a training checkpoint, and the module that holds its EMA."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )
    from torch.distributed.device_mesh import init_device_mesh
    from train_step import build_from_args

    from ditkit.training.ema import make_shadow
    from ditkit.training.parallel import shard_blocks

    torch.manual_seed(0)
    model, objective = build_from_args({**args, "grad_checkpointing": False})
    holder = torch.nn.ModuleDict({"model": model, "ema": make_shadow(model)})
    mesh = init_device_mesh("cpu", (int(os.environ["WORLD_SIZE"]),))
    shard_blocks(holder["model"], mesh)
    shard_blocks(holder["ema"], mesh)
    opt = torch.optim.AdamW(holder["model"].parameters(), lr=1e-4)
    s = args["latent_size"]
    batch = {"x": torch.randn(2, 4, s, s), "y": torch.tensor([1, 2])}
    objective.training_losses(holder["model"], batch)["loss"].mean().backward()
    opt.step()
    options = StateDictOptions(full_state_dict=False, cpu_offload=True)  # as Lightning
    return {
        "state_dict": get_model_state_dict(holder, options=options),
        "optimizer_0": get_optimizer_state_dict(holder, opt, options=options),
    }


def _rank(rank: int, world_size: int, port: int, args: dict, folder: str, out_dir: str) -> None:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    from ditkit.checkpoints.atomic import replace_folder, temporary_name
    from ditkit.checkpoints.sharded_async import ShardedAsyncWriter, write_metadata

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world_size), RANK=str(rank)
    )
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    strategy, writer = _Strategy(rank), ShardedAsyncWriter()
    state = _state(args)
    meta = {"global_step": 1, "loops": {}}
    target = Path(folder) / "last.ckpt"
    times: dict[str, list[float]] = {"sync": [], "async": [], "written": [], "commit": []}

    def temporary() -> Path:
        names = [str(temporary_name(target))]
        dist.broadcast_object_list(names)  # rank 0's name, as AtomicModelCheckpoint
        tmp = Path(names[0])
        tmp.mkdir(parents=True, exist_ok=True)
        return tmp

    try:
        for step in range(args["repeats"] + 1):  # the first of each: a warm-up, not counted
            dist.barrier()
            start = time.perf_counter()
            tmp = temporary()
            dcp.save(state, checkpoint_id=tmp)
            if rank == 0:
                write_metadata(meta, tmp)
            if strategy.reduce_boolean_decision(True) and rank == 0:
                replace_folder(tmp, target)
            strategy.reduce_boolean_decision(True)  # the final agreement of _save_checkpoint
            if step:
                times["sync"].append(time.perf_counter() - start)
        for step in range(args["repeats"] + 1):
            dist.barrier()
            start = time.perf_counter()
            tmp = temporary()
            if rank == 0:
                write_metadata(meta, tmp)
            if strategy.reduce_boolean_decision(True):
                writer.submit(state, tmp, str(target), step)
            strategy.reduce_boolean_decision(True)
            stall = time.perf_counter() - start
            writer._pending[-1].future.result()  # the write done (a benchmark may look inside)
            written = time.perf_counter() - start
            commit_start = time.perf_counter()
            failed, error = writer.commit(strategy)  # what the next save does first
            if error is not None:
                raise error
            if step:
                times["async"].append(stall)
                times["written"].append(written)
                times["commit"].append(time.perf_counter() - commit_start)
        size = sum(f.stat().st_size for f in target.rglob("*") if f.is_file())
        torch.save({**times, "size": size}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def sharded_save(args: dict) -> dict:
    """Run `_rank` on `world_size` spawned gloo processes; the slowest rank's seconds."""
    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    world = args["world_size"]
    with (
        tempfile.TemporaryDirectory(dir=args["save_dir"]) as folder,
        tempfile.TemporaryDirectory() as out_dir,
    ):
        mp.spawn(_rank, args=(world, port, args, folder, out_dir), nprocs=world)
        ranks = [
            torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=True)
            for r in range(world)
        ]

    def slowest(key: str) -> float:
        return round(max(statistics.median(r[key]) for r in ranks), 3)

    return dict(
        measure="sharded_save",
        model=args["model"],
        world_size=world,
        repeats=args["repeats"],
        folder_mb=round(ranks[0]["size"] / 2**20, 1),
        sync_stall_seconds=slowest("sync"),
        async_stall_seconds=slowest("async"),
        async_written_seconds=slowest("written"),
        async_commit_seconds=slowest("commit"),
        per_rank={k: [r[k] for r in ranks] for k in ("sync", "async", "written", "commit")},
    )
