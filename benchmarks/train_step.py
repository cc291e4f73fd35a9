"""Time one training step (model + objective + AdamW + EMA) on random 256 px latents (4 x 32 x 32).

    python benchmarks/train_step.py model=dit_s batch_size=8 precision=32-true compile=false steps=10

Prints a table line per setting and, last, one JSON line: model, batch_size, precision, step_s
(median), imgs_per_sec, gflops_per_sec (3 x forward FLOPs counted from the architecture),
MFU both ways: `mfu` against `peak_gflops` (a matmul in the same precision, measured here) and
`mfu_nominal` against `nominal_peak_gflops` (the datasheet's dense 16-bit peak of the detected GPU;
null on CPU), peak_mem_mb, and the loss of every step (warm-up included; `seed=` fixes weights,
data and draws, so a bf16 run and an `fp8=true` run compare step for step). `fp8=true` converts the
blocks' linears as `module.fp8=true` does (FP8 GPUs only, with compile=true and bf16-mixed).
"""

from pathlib import Path

import torch
from common import (
    PRECISIONS,
    device_of,
    emit,
    matmul_peak_flops,
    mfu_fields,
    nominal_peak_flops,
    parse_args,
    peak_memory_mb,
    sig,
    summarize,
    time_calls,
)
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from ditkit.checkpoints import instantiate_model
from ditkit.training.ema import update_ema
from ditkit.training.fp8 import check_fp8, convert_fp8
from ditkit.training.parallel import checkpoint_blocks, compile_blocks

CONF = Path(__file__).resolve().parents[1] / "conf"


def build(model: str, objective: str, latent_size: int, overrides: list[str]):
    """Model and objective from the real Hydra configs, for ImageNet latents (4 channels, 1000
    classes)."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            overrides=[
                f"+model={model}",
                f"+objective={objective}",
                f"+data.latent_size={latent_size}",
                "+data.latent_channels=4",
                "+data.num_classes=1000",
                *overrides,
            ]
        )
    return instantiate_model(cfg.model), instantiate(cfg.objective)


def build_from_args(args: dict):
    """build() for the scripts' common keys: model, objective, latent_size, depth; then, from
    outside the model and in the training module's order, `fp8`, `compile` (when the script has
    them) and `grad_checkpointing` (module.fp8 / module.compile / module.activation_checkpointing)."""
    overrides = [] if args["depth"] is None else [f"model.depth={args['depth']}"]
    model, objective = build(args["model"], args["objective"], args["latent_size"], overrides)
    if args.get("fp8"):
        check_fp8(args["compile"], args["precision"])  # the training module's errors, before work
        convert_fp8(model)
    if args.get("compile"):
        compile_blocks(model)  # each block, compiled once for all
    if args["grad_checkpointing"]:
        checkpoint_blocks(model)
    return model, objective


def main() -> None:
    args = parse_args(
        dict(
            model="dit_s",
            objective="ddpm",
            batch_size=8,
            precision="32-true",
            compile=False,
            fp8=False,
            grad_checkpointing=False,
            steps=10,
            warmup=3,
            latent_size=32,
            depth=None,
            device="auto",
            peak_matmul=0,
            seed=0,
        )
    )  # 0: the default size for the device
    device = device_of(args["device"])
    # The same seed gives the same weights and the same draws of t and noise, so two runs (bf16 and
    # fp8=true) compare their losses step for step.
    torch.manual_seed(args["seed"])
    model, objective = build_from_args(args)
    model.to(device).train()
    ema = [p.detach().float().clone() for p in model.parameters()]
    opt = torch.optim.AdamW(
        model.parameters(), lr=1e-4, weight_decay=0.0, fused=True
    )  # as DiffusionModule
    dtype = PRECISIONS[args["precision"]]
    b, s = args["batch_size"], args["latent_size"]
    x = torch.randn(b, 4, s, s, device=device)
    y = torch.randint(0, 1000, (b,), device=device)

    losses = []

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = objective.training_losses(model, {"x": x, "y": y})["loss"].mean()
        losses.append(loss.detach())  # read after the timing: no host sync inside it
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        update_ema(ema, list(model.parameters()), 0.9999)

    step_s = summarize(time_calls(step, args["steps"], args["warmup"], device, desc="train steps"))
    flops = 3 * model.forward_flops(b)  # backward ~ 2x forward
    peak = matmul_peak_flops(device, dtype or torch.float32, args["peak_matmul"] or None)
    record = dict(
        model=args["model"],
        objective=args["objective"],
        batch_size=b,
        precision=args["precision"],
        compile=args["compile"],
        fp8=args["fp8"],
        grad_checkpointing=args["grad_checkpointing"],
        device=str(device),
        threads=torch.get_num_threads(),
        step_s=sig(step_s),
        imgs_per_sec=sig(b / step_s),
        gflops_per_sec=sig(flops / step_s / 1e9),
        **mfu_fields(flops / step_s, peak, nominal_peak_flops(device, args["precision"])),
        peak_mem_mb=round(peak_memory_mb(device), 1),
        seed=args["seed"],
        losses=[sig(float(v), 5) for v in losses],  # warm-up steps first, then the timed ones
    )
    print(
        f"| {record['model']} | {b} | {record['precision']} | {record['step_s']:.3f} s | "
        f"{record['imgs_per_sec']} img/s | {record['gflops_per_sec']} GFLOP/s | "
        f"MFU {record['mfu']:.1%} of the measured matmul |"
    )
    emit(record)


if __name__ == "__main__":
    main()
