"""Where a training step's time goes: the top kernels of one (compiled) step and their shares.

    python benchmarks/profile_step.py model=dit_xl batch_size=128 precision=bf16-mixed compile=true
    python benchmarks/profile_step.py model=dit_s depth=1 latent_size=8 batch_size=2 device=cpu  # tests

The step is train_step.py's (model + objective + fused AdamW + EMA, the same flags: compile, fp8,
grad_checkpointing). After `warmup` untimed steps (the compile happens there), `steps` steps run
under torch.profiler. On a GPU the kernels are ranked by their own device time (`self_device_time`,
what the GPU spent in that kernel, children excluded); on a CPU by their own CPU time. Prints one
JSON line: `total_ms` per step (the sum over all kernels), and `top`: the `top` largest as
{name, ms per step, share of total_ms, calls per step}.
"""

import torch
from common import PRECISIONS, device_of, emit, parse_args, sig, sync
from torch.profiler import ProfilerActivity, profile
from train_step import build_from_args

from ditkit.training.ema import update_ema


def kernel_table(events, device_type: str, steps: int, top: int) -> tuple[float, list[dict]]:
    """(total ms per step, the `top` largest kernels) from profiler key averages, by self time on
    the device that ran the step."""
    field = "self_device_time_total" if device_type == "cuda" else "self_cpu_time_total"
    rows = [(e.key, getattr(e, field) / 1e3 / steps, e.count / steps) for e in events]
    rows = [r for r in rows if r[1] > 0]
    total = sum(ms for _, ms, _ in rows)
    rows.sort(key=lambda r: -r[1])
    table = [
        dict(name=name, ms=sig(ms, 4), share=sig(ms / total, 4), calls=sig(calls, 4))
        for name, ms, calls in rows[:top]
    ]
    return total, table


def main() -> None:
    args = parse_args(
        dict(
            model="dit_s",
            objective="ddpm",
            batch_size=8,
            precision="bf16-mixed",
            compile=False,
            fp8=False,
            grad_checkpointing=False,
            steps=2,
            warmup=3,
            latent_size=32,
            depth=None,
            device="auto",
            top=15,
            seed=0,
        )
    )
    device = device_of(args["device"])
    torch.manual_seed(args["seed"])
    model, objective = build_from_args(args)
    model.to(device).train()
    ema = [p.detach().float().clone() for p in model.parameters()]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0, fused=True)
    dtype = PRECISIONS[args["precision"]]
    b, s = args["batch_size"], args["latent_size"]
    x = torch.randn(b, 4, s, s, device=device)
    y = torch.randint(0, 1000, (b,), device=device)

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = objective.training_losses(model, {"x": x, "y": y})["loss"].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        update_ema(ema, list(model.parameters()), 0.9999)

    for _ in range(args["warmup"]):
        step()
    sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(args["steps"]):
            step()
        sync(device)
    total, table = kernel_table(prof.key_averages(), device.type, args["steps"], args["top"])
    for row in table:
        print(f"{row['share']:7.1%} {row['ms']:10.3f} ms  x{row['calls']:<6g} {row['name'][:90]}")
    emit(
        dict(
            model=args["model"],
            batch_size=b,
            precision=args["precision"],
            compile=args["compile"],
            fp8=args["fp8"],
            grad_checkpointing=args["grad_checkpointing"],
            device=str(device),
            ranked_by="self_device_time" if device.type == "cuda" else "self_cpu_time",
            total_ms=sig(total, 5),
            top=table,
        )
    )


if __name__ == "__main__":
    main()
