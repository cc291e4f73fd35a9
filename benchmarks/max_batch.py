"""The largest training batch that fits in device memory: doubling, then bisection, of full training
steps.

    python benchmarks/max_batch.py model=dit_xl precision=bf16-mixed grad_checkpointing=false

Prints one JSON line: model, precision, grad_checkpointing, max_batch, peak_mem_mb at that batch.
`limit` caps the search (on CPU, where nothing runs out of memory quickly, it is the answer's
ceiling).
"""

import torch
from common import PRECISIONS, device_of, emit, parse_args, peak_memory_mb
from train_step import build_from_args


def fits(model, objective, batch: int, latent_size: int, dtype, device) -> bool:
    """One forward/backward at `batch`; False on out-of-memory."""
    try:
        x = torch.randn(batch, 4, latent_size, latent_size, device=device)
        y = torch.randint(0, 1000, (batch,), device=device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = objective.training_losses(model, {"x": x, "y": y})["loss"].mean()
        loss.backward()
        return True
    except torch.OutOfMemoryError:
        return False
    finally:
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()


def main() -> None:
    args = parse_args(
        dict(
            model="dit_xl",
            objective="ddpm",
            precision="bf16-mixed",
            grad_checkpointing=False,
            latent_size=32,
            depth=None,
            start=8,
            limit=4096,
            device="auto",
        )
    )
    device = device_of(args["device"])
    model, objective = build_from_args(args)
    model.to(device).train()
    # Adam's two moments and the fp32 EMA take 3x the weights' memory in a real run: hold them here
    # too.
    reserved = [torch.zeros_like(p) for p in model.parameters() for _ in range(3)]  # noqa: F841
    dtype = PRECISIONS[args["precision"]]
    ok, bad = 0, None
    batch = args["start"]
    while batch <= args["limit"] and fits(
        model, objective, batch, args["latent_size"], dtype, device
    ):
        ok, batch = batch, batch * 2
    if batch <= args["limit"]:
        bad = batch
    while bad is not None and bad - ok > max(1, ok // 8):  # bisect to within 1/8 of the answer
        mid = (ok + bad) // 2
        ok, bad = (
            (mid, bad)
            if fits(model, objective, mid, args["latent_size"], dtype, device)
            else (ok, mid)
        )
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        fits(model, objective, ok, args["latent_size"], dtype, device)
    emit(
        dict(
            model=args["model"],
            precision=args["precision"],
            grad_checkpointing=args["grad_checkpointing"],
            max_batch=ok,
            peak_mem_mb=round(peak_memory_mb(device), 1),
        )
    )


if __name__ == "__main__":
    main()
