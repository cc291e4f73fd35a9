"""The memory that per-block activation checkpointing and FSDP2 sharding save.

    python benchmarks/memory.py model=dit_b batch_size=8 world_size=2

Activations: the bytes one training forward leaves held for its backward (on CPU, glibc's count of
heap bytes in use, `mallinfo2`; on a GPU, the allocator's), with and without `grad_checkpointing`.
Training state: the bytes one rank holds for weights, gradients, AdamW's two moments and the fp32
EMA after one optimizer step, unsharded against `world_size` gloo processes under FSDP2
(`shard_blocks`, as DiffusionModule does). Checkpoint save: a `save_mb` MB state written by ditkit's
save (`write_checkpoint_file`: torch.save streamed into a temporary file beside the target), by its
asynchronous save (async_save=true: a host copy, then the same write in a thread) and by Lightning's
`_atomic_save` (what a stock ModelCheckpoint does), each in a forked process: the peak extra host
memory during the save (peak RSS over the RSS with the state built), the seconds it took and those
training waits for, and the most bytes seen in the system temp folder (pointed at an empty folder
for the purpose), against the file's size. Sharded save (measure=sharded_save, benchmarks/sharded_save.py):
the seconds a training step waits per save of an FSDP2 checkpoint folder over `world_size` gloo
processes, synchronous against async_save=true (DCP's async_save), `repeats` saves each. `measure=`
picks some of activations,training_state,checkpoint_save,sharded_save (default: all but the last).
Prints a table and one JSON line per measurement.
"""

import ctypes
import multiprocessing
import os
import resource
import socket
import tempfile
import threading
import time
from pathlib import Path

import torch
from common import PRECISIONS, device_of, emit, parse_args

# The model and FSDP2 imports live in the functions that use them (`measure=checkpoint_save` alone
# starts quickly).


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def bytes_in_use(device: torch.device) -> int:
    """Bytes allocated now: the CUDA allocator's count, or glibc's heap plus mmap-ed blocks on
    CPU."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    libc = ctypes.CDLL("libc.so.6")
    if not hasattr(libc, "mallinfo2"):
        raise SystemExit(
            "activation memory on CPU needs glibc >= 2.33 (mallinfo2); run on Linux or a GPU"
        )
    libc.mallinfo2.restype = _MallInfo2
    info = libc.mallinfo2()
    return info.uordblks + info.hblkhd


def activation_bytes(args: dict, grad_checkpointing: bool, device: torch.device) -> int:
    """Bytes held between the end of a training forward and its backward."""
    from train_step import build_from_args

    torch.manual_seed(0)
    model, objective = build_from_args({**args, "grad_checkpointing": grad_checkpointing})
    model.to(device).train()
    b, s = args["batch_size"], args["latent_size"]
    x = torch.randn(b, 4, s, s, device=device)
    y = torch.randint(0, 1000, (b,), device=device)
    dtype = PRECISIONS[args["precision"]]
    before = bytes_in_use(device)
    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        loss = objective.training_losses(model, {"x": x, "y": y})["loss"].mean()
    held = bytes_in_use(device) - before
    loss.backward()
    return held


def state_bytes(model: torch.nn.Module, ema: torch.nn.Module, opt: torch.optim.Optimizer) -> dict:
    """This rank's bytes of weights, gradients, AdamW moments and EMA (local shards of DTensors)."""
    from torch.distributed.tensor import DTensor

    def nbytes(tensors) -> int:
        local = (t.to_local() if isinstance(t, DTensor) else t for t in tensors)
        return sum(t.numel() * t.element_size() for t in local)

    params = list(model.parameters())
    moments = [state[k] for state in opt.state.values() for k in ("exp_avg", "exp_avg_sq")]
    return dict(
        weights=nbytes(params),
        grads=nbytes(p.grad for p in params if p.grad is not None),
        adam_moments=nbytes(moments),
        ema=nbytes(ema.parameters()),
    )


def training_state(args: dict, mesh=None) -> dict:
    """Build, optionally shard (model and EMA alike), take one AdamW step, count this rank's
    state."""
    from train_step import build_from_args

    from ditkit.training.ema import make_shadow
    from ditkit.training.parallel import shard_blocks

    torch.manual_seed(0)
    model, objective = build_from_args({**args, "grad_checkpointing": False})
    model.train()
    ema = make_shadow(model)
    if mesh is not None:
        shard_blocks(model, mesh)
        shard_blocks(ema, mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    s = args["latent_size"]
    loss = objective.training_losses(
        model, {"x": torch.randn(2, 4, s, s), "y": torch.tensor([1, 2])}
    )["loss"]
    loss.mean().backward()
    opt.step()
    return state_bytes(model, ema, opt)


def _sharded_rank(rank: int, world_size: int, port: int, args: dict, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        mesh = init_device_mesh("cpu", (world_size,))
        torch.save(training_state(args, mesh), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def sharded_state(args: dict) -> list[dict]:
    """training_state on each of `world_size` CPU processes (gloo) under FSDP2."""
    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(
            _sharded_rank, args=(args["world_size"], port, args, out_dir), nprocs=args["world_size"]
        )
        return [
            torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=True)
            for r in range(args["world_size"])
        ]


def _folder_bytes(folder: str) -> int:
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(root, name))
            except FileNotFoundError:  # renamed away between the listing and the stat
                pass
    return total


def _save_in_fresh_process(variant: str, size_mb: int, run_dir: str, temp_dir: str, out) -> None:
    """One save of a `size_mb` MB state into run_dir/checkpoints/last.ckpt; reports through `out`."""
    torch.set_num_threads(1)
    tempfile.tempdir = temp_dir  # the "system temp folder" of this process, watched below
    os.environ["TMPDIR"] = temp_dir
    chunk = 4 * 2**20 // 4  # 4 MB float32 tensors, like the parameters and moments of a model
    state = {"state_dict": {f"w{i}": torch.randn(chunk) for i in range(size_mb // 4)}}
    target = Path(run_dir) / "checkpoints" / "last.ckpt"
    finish = None
    if variant == "lightning":
        from lightning.fabric.utilities.cloud_io import _atomic_save as save
    elif variant == "ditkit_async":  # callbacks.checkpoint.async_save=true
        from ditkit.checkpoints.background import BackgroundWriter

        writer = BackgroundWriter()

        def save(state, path):
            writer.submit(state, path, 0)

        def finish():
            _, error = writer.wait()
            if error is not None:
                raise error

    else:
        from ditkit.checkpoints.saving import write_checkpoint_file as save
    warmup = Path(run_dir) / "warmup.ckpt"  # faults in the save's code and buffers first
    save({"w": torch.zeros(16)}, warmup)
    if finish is not None:
        finish()
    warmup.unlink()
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    outside, done = [0], threading.Event()

    def watch() -> None:  # the temp folder's bytes, every millisecond of the save
        while not done.is_set():
            outside[0] = max(outside[0], _folder_bytes(temp_dir))
            time.sleep(0.001)

    target.parent.mkdir(parents=True)
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    start = time.perf_counter()
    try:
        save(state, target)
        stall = time.perf_counter() - start  # what training waits for
        if finish is not None:
            finish()
    except BaseException as err:
        out.put(dict(error=f"{type(err).__name__}: {err}"))
        raise
    finally:
        done.set()
    seconds = time.perf_counter() - start
    watcher.join()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    left = sorted(p.name for p in target.parent.iterdir() if p != target)
    out.put(
        dict(
            extra_rss=peak - base,
            seconds=seconds,
            stall=stall,
            outside=outside[0],
            size=target.stat().st_size,
            left=left,
        )
    )


def checkpoint_save(size_mb: int, variant: str, where: str) -> dict:
    """Peak extra RSS, seconds and bytes outside the run folder of one save (fresh process)."""
    # Forked after the imports: the child only builds the state and saves it (its peak RSS is its
    # own, measured against its RSS with the state built).
    import lightning.fabric.utilities.cloud_io  # noqa: F401

    import ditkit.checkpoints.saving  # noqa: F401

    ctx = multiprocessing.get_context("fork")
    with (
        tempfile.TemporaryDirectory(dir=where) as run_dir,
        tempfile.TemporaryDirectory(dir=where) as temp_dir,
    ):
        out = ctx.Queue()
        proc = ctx.Process(
            target=_save_in_fresh_process, args=(variant, size_mb, run_dir, temp_dir, out)
        )
        proc.start()
        result = out.get()
        proc.join()
    if "error" in result:
        raise SystemExit(f"the {variant} save failed: {result['error']}")
    size = result["size"]
    return dict(
        measure="checkpoint_save",
        variant=variant,
        checkpoint_mb=mb(size),
        extra_host_mb=mb(result["extra_rss"]),
        extra_fraction=round(result["extra_rss"] / size, 4),
        seconds=round(result["seconds"], 3),
        training_stall_seconds=round(result["stall"], 3),
        outside_run_folder_mb=mb(result["outside"]),
        left_in_folder=result["left"],
    )


def mb(n: float) -> float:
    return round(n / 2**20, 1)


def main() -> None:
    args = parse_args(
        dict(
            model="dit_b",
            objective="ddpm",
            batch_size=8,
            precision="32-true",
            latent_size=32,
            depth=None,
            world_size=2,
            device="auto",
            measure="activations,training_state,checkpoint_save",
            save_mb=512,
            save_dir=".",
            repeats=2,
        )
    )
    measures = set(args["measure"].split(","))
    unknown = measures - {"activations", "training_state", "checkpoint_save", "sharded_save"}
    if unknown:
        raise SystemExit(
            f"measure={args['measure']}: unknown {sorted(unknown)}; choose from "
            "activations,training_state,checkpoint_save,sharded_save"
        )
    if "checkpoint_save" in measures:
        for variant in ("ditkit", "ditkit_async", "lightning"):
            r = checkpoint_save(args["save_mb"], variant, args["save_dir"])
            print(
                f"| checkpoint save, {variant} | {r['checkpoint_mb']} MB file | "
                f"{r['extra_host_mb']} MB extra host memory ({r['extra_fraction']:.1%}) | "
                f"{r['seconds']} s, training waits {r['training_stall_seconds']} s | "
                f"{r['outside_run_folder_mb']} MB in the system temp folder |"
            )
            emit(r)
    if "sharded_save" in measures:  # not in the default list: minutes for DiT-B on a CPU
        from sharded_save import sharded_save

        r = sharded_save(args)
        print(
            f"| sharded save, {r['model']}, FSDP2 x{r['world_size']} | {r['folder_mb']} MB folder | "
            f"sync: training waits {r['sync_stall_seconds']} s | async_save: training waits "
            f"{r['async_stall_seconds']} s, written after {r['async_written_seconds']} s, "
            f"commit at the next save {r['async_commit_seconds']} s |"
        )
        emit(r)
    if measures & {"activations", "training_state"}:
        activations_and_state(args)


def activations_and_state(args: dict) -> None:
    device = device_of(args["device"])
    plain = activation_bytes(args, False, device)
    ckpt = activation_bytes(args, True, device)
    full = training_state(args)
    ranks = sharded_state(args)
    total, per_rank = sum(full.values()), [sum(r.values()) for r in ranks]
    print(
        f"| {args['model']} | activations, batch {args['batch_size']} | {mb(plain)} MB -> {mb(ckpt)} MB with "
        f"per-block checkpointing |\n| {args['model']} | weights + grads + AdamW + EMA | {mb(total)} MB -> "
        f"{mb(max(per_rank))} MB per rank under FSDP2 x{len(ranks)} |"
    )
    emit(
        dict(
            measure="activations",
            model=args["model"],
            batch_size=args["batch_size"],
            precision=args["precision"],
            device=str(device),
            plain_mb=mb(plain),
            checkpointed_mb=mb(ckpt),
            saved_mb=mb(plain - ckpt),
            saved_fraction=round(1 - ckpt / plain, 4),
        )
    )
    emit(
        dict(
            measure="training_state",
            model=args["model"],
            world_size=len(ranks),
            unsharded_mb=mb(total),
            per_rank_mb=[mb(b) for b in per_rank],
            ideal_per_rank_mb=mb(total / len(ranks)),
            saved_mb=mb(total - max(per_rank)),
            unsharded=full,
            ranks=ranks,
        )
    )


if __name__ == "__main__":
    main()
