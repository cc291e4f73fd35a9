"""ditkit's training step against the reference DiT implementation, side by side in one process.

    git clone https://github.com/facebookresearch/DiT /tmp/DiT && pip install timm
    python benchmarks/compare_reference.py reference=/tmp/DiT model=S/2 batch_size=8 steps=10

Both steps are the whole training step as each codebase runs it: model forward through the
objective's loss (DDPM, learned sigma, hybrid loss), backward, AdamW, EMA update. Both models hold
the same weights (ditkit's state_dict is the official layout) and see the same batch. Timings
alternate between the two so that machine noise hits both alike. compile=true compiles ditkit's
blocks as training's `module.compile=true` does (the reference has no such option). Prints a table
and one JSON line per precision.
"""

import copy
import sys

import torch
from common import PRECISIONS, device_of, emit, matmul_peak_flops, parse_args, summarize, time_calls

from ditkit.models import build_dit
from ditkit.objectives import GaussianDiffusion
from ditkit.training.ema import update_ema
from ditkit.training.parallel import compile_blocks


def reference_step(ref_models, ref_diffusion, ref_train, name, state, x, y, dtype, device):
    model = ref_models.DiT_models[name](input_size=x.shape[-1]).to(device).train()
    model.load_state_dict(state)
    ema = copy.deepcopy(model).requires_grad_(False)
    diffusion = ref_diffusion.create_diffusion(timestep_respacing="")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0)

    def step():
        t = torch.randint(0, diffusion.num_timesteps, (x.shape[0],), device=device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = diffusion.training_losses(model, x, t, dict(y=y))["loss"].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        ref_train.update_ema(ema, model)

    return model, step


def ditkit_step(variant, patch, state, x, y, dtype, device, compile_model):
    model = build_dit(variant, patch, input_size=x.shape[-1]).to(device).train()
    model.load_state_dict(state)
    if compile_model:
        compile_blocks(model)  # as training's `module.compile=true`
    ema = [p.detach().float().clone() for p in model.parameters()]
    params = list(model.parameters())
    objective = GaussianDiffusion()
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0, fused=True)  # as DiffusionModule

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = objective.training_losses(model, {"x": x, "y": y})["loss"].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        update_ema(ema, params, 0.9999)

    return model, step


def main() -> None:
    args = parse_args(
        dict(
            reference=None,
            model="S/2",
            batch_size=8,
            steps=10,
            warmup=2,
            rounds=3,
            latent_size=32,
            precisions="32-true,bf16-mixed",
            compile=False,
            device="auto",
            peak_matmul=0,
        )
    )
    if args["reference"] is None:
        raise SystemExit(
            "pass reference=/path/to/facebookresearch/DiT (a checkout; it needs `pip install timm`)"
        )
    sys.path.insert(0, args["reference"])
    import diffusion as ref_diffusion  # noqa: E402  (the reference checkout's packages)
    import models as ref_models  # noqa: E402

    import train as ref_train  # noqa: E402

    device = device_of(args["device"])
    variant, patch = args["model"].split("/")
    torch.manual_seed(0)
    b, s = args["batch_size"], args["latent_size"]
    state = build_dit(variant, int(patch), input_size=s).state_dict()
    x = torch.randn(b, 4, s, s, device=device)
    y = torch.randint(0, 1000, (b,), device=device)
    name = f"DiT-{args['model']}"
    for precision in args["precisions"].split(","):
        dtype = PRECISIONS[precision]
        ref_model, ref_step = reference_step(
            ref_models, ref_diffusion, ref_train, name, state, x, y, dtype, device
        )
        ours_model, ours_step = ditkit_step(
            variant, int(patch), state, x, y, dtype, device, args["compile"]
        )
        ref_times, ours_times = [], []
        for _ in range(args["rounds"]):  # alternate, so drifting machine load hits both
            ref_times += time_calls(ref_step, args["steps"], args["warmup"], device)
            ours_times += time_calls(ours_step, args["steps"], args["warmup"], device)
        ref_s, ours_s = summarize(ref_times), summarize(ours_times)
        flops = 3 * ours_model.forward_flops(b)
        peak = matmul_peak_flops(device, dtype or torch.float32, args["peak_matmul"] or None)
        record = dict(
            model=name,
            batch_size=b,
            precision=precision,
            ditkit_compile=args["compile"],
            device=str(device),
            threads=torch.get_num_threads(),
            reference_step_s=round(ref_s, 4),
            ditkit_step_s=round(ours_s, 4),
            reference_imgs_per_sec=round(b / ref_s, 2),
            ditkit_imgs_per_sec=round(b / ours_s, 2),
            speedup=round(ref_s / ours_s, 3),
            peak_gflops=round(peak / 1e9, 1),
            reference_mfu=round(flops / ref_s / peak, 4),
            ditkit_mfu=round(flops / ours_s / peak, 4),
        )
        setting = precision + (", ditkit compiled" if args["compile"] else "")
        print(
            f"| {name} | {b} | {setting} | reference {b / ref_s:.2f} img/s | ditkit {b / ours_s:.2f} img/s | "
            f"x{ref_s / ours_s:.2f} | MFU {record['reference_mfu']:.1%} -> {record['ditkit_mfu']:.1%} |"
        )
        emit(record)
        del ref_model, ours_model


if __name__ == "__main__":
    main()
