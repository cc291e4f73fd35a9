"""Time sampling N latents with each registered sampler, against the bare model forwards it needs.

    python benchmarks/sample.py model=dit_xl num_samples=32 cfg_scale=1.5 precision=bf16-mixed
    python benchmarks/sample.py model=dit_xl samplers=ddpm,euler cfg_scale=1.5 precision=bf16-mixed \
        compile=true num_samples=128      # the evaluate.py precision=bf16-mixed compile=true path
    python benchmarks/sample.py tiny=true        # a depth-2, width-32 DiT on 8x8 latents (tests)

Prints one JSON line per sampler (the sampler registry gives its objective and default steps;
steps=N overrides them): steps, model_evals (model calls, a guided call being one batch of 2N),
seconds (the whole sampler), forward_seconds (the same sequence of model calls on prepared inputs,
nothing else), and overhead = seconds / forward_seconds - 1, the sampler's own cost (target: < 5%),
images/s, the model's FLOP/s, MFU both ways (`mfu` against a matmul in the same precision measured
here, `mfu_nominal` against the datasheet peak of the detected GPU, null on CPU), peak memory, and
the sampling time of FID-50K at that rate on 1 and 8 GPUs (`fid50k_hours_1gpu`, `_8gpu`: 50,000 /
images/s, split evenly over the GPUs; VAE decoding and Inception not included). compile=true
compiles each block (`compile_blocks`, as evaluate.py compile=true and training do); the guided
conditional and null halves always go through the model as one batch of 2N. Each time is the best
of `repeats` interleaved runs; threads=N sets torch's CPU threads.
"""

import time
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
    progress_bar,
    sig,
    sync,
)
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from ditkit.checkpoints import instantiate_model
from ditkit.objectives import get_sampler
from ditkit.objectives.samplers import all_samplers
from ditkit.training.parallel import compile_blocks

CONF = Path(__file__).resolve().parents[1] / "conf"
FID_SAMPLES = 50_000  # FID-50K, the ImageNet protocol of DiT, SiT and REPA
TINY = ["model.depth=2", "model.hidden_size=32", "model.num_heads=2"]


def build(args: dict, sampler: str):
    """Model and the sampler's objective from the real Hydra configs, and the sampler's spec (its
    objective and default steps) from the registry."""
    spec = get_sampler(sampler)
    overrides = [
        f"+model={args['model']}",
        f"+objective={spec.objective}",
        f"+data.latent_size={args['latent_size']}",
        "+data.latent_channels=4",
        f"+data.num_classes={args['num_classes']}",
    ]
    if spec.objective == "meanflow":  # MeanFlow's backbone takes a second time (r or t - r)
        overrides.append("model.second_time=true")
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(overrides=overrides + (TINY if args["tiny"] else []))
    return instantiate_model(cfg.model), instantiate(cfg.objective), spec


class CountingModel(torch.nn.Module):
    """The model, recording the batch size of every call. dry=True returns zeros of the output's
    shape instead of calling it: the sampler's sequence of calls, recorded without the model's cost.
    It passes the Backbone contract's condition through, so guidance works on it as on the model."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.batches = []
        self.dry = False
        self.condition_keys = model.condition_keys
        self.null_condition = model.null_condition
        # What a joint-token term (REG) reads of the backbone: the same module objects.
        for name in ("blocks", "final_layer", "in_channels", "accepts_prefix"):
            if hasattr(model, name):
                setattr(self, name, getattr(model, name))

    def forward(self, x, t, **condition):
        self.batches.append(x.shape[0])
        if self.dry:
            return x.new_zeros(x.shape[0], self.model.out_channels, *x.shape[2:])
        return self.model(x, t, **condition)


def timed(fn, device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def bench(args: dict, sampler: str, device: torch.device, tick=lambda: None) -> dict:
    """tick: called after the recording run and after each repeat (the progress bar)."""
    model, objective, scfg = build(args, sampler)
    model.to(device).eval()
    if args["compile"]:
        compile_blocks(model)
    steps = args["steps"] or scfg.default_steps
    n, c, s = args["num_samples"], model.in_channels, model.input_size
    g = torch.Generator(device=device).manual_seed(0)
    x_T = torch.randn(n, c, s, s, device=device, generator=g)
    y = torch.randint(0, model.num_classes, (n,), device=device, generator=g)
    dtype = PRECISIONS[args["precision"]]
    counter = CountingModel(model)

    def run_sampler():
        counter.batches.clear()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            objective.sample(
                counter,
                x_T,
                {"y": y},
                sampler=scfg.name,
                steps=steps,
                cfg_scale=args["cfg_scale"],
                **scfg.options,
            )

    counter.dry = True
    run_sampler()  # records the calls the bare run must repeat, at no model cost
    counter.dry = False
    tick()
    batches = list(counter.batches)
    inputs = {
        b: (
            torch.randn(b, c, s, s, device=device),
            torch.full((b,), 500.0, device=device),
            torch.randint(0, model.num_classes, (b,), device=device),
        )
        for b in set(batches)
    }

    # A MeanFlow backbone also takes its second time (t - r).
    second = {
        b: {"t2": inputs[b][1]} if getattr(model, "second_time", False) else {} for b in inputs
    }

    @torch.no_grad()
    def run_forwards(calls: list[int]):
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            for b in calls:
                model(*inputs[b], **second[b])

    run_forwards(sorted(set(batches)))  # warm-up: one call per batch size
    # Interleaved, best of `repeats`: a machine busy with other work slows both alike.
    seconds = forward_seconds = float("inf")
    for _ in range(args["repeats"]):
        seconds = min(seconds, timed(run_sampler, device))
        forward_seconds = min(forward_seconds, timed(lambda: run_forwards(batches), device))
        tick()
    flops = sum(model.forward_flops(b) for b in batches)
    peak = matmul_peak_flops(device, dtype or torch.float32, args["peak_matmul"] or None)
    return dict(
        sampler=scfg.name,
        objective=objective.name,
        steps=steps,
        model_evals=len(batches),
        batch=max(batches),
        num_samples=n,
        cfg_scale=args["cfg_scale"],
        model=args["model"] + ("(tiny)" if args["tiny"] else ""),
        latent=[c, s, s],
        precision=args["precision"],
        device=str(device),
        seconds=sig(seconds),
        forward_seconds=sig(forward_seconds),
        overhead=sig(seconds / forward_seconds - 1),
        imgs_per_sec=sig(n / seconds),
        gflops_per_sec=sig(flops / seconds / 1e9),
        **mfu_fields(flops / seconds, peak, nominal_peak_flops(device, args["precision"])),
        peak_mem_mb=round(peak_memory_mb(device), 1),
        compile=args["compile"],
        fid50k_hours_1gpu=sig(FID_SAMPLES / (n / seconds) / 3600),
        fid50k_hours_8gpu=sig(FID_SAMPLES / (n / seconds) / 3600 / 8),
    )


def main() -> None:
    args = parse_args(
        dict(
            model="dit_xl",
            tiny=False,
            latent_size=32,
            num_classes=1000,
            num_samples=32,
            samplers="all",  # comma-separated names, or all: every registered sampler
            steps=0,
            cfg_scale=1.5,
            precision="32-true",
            compile=False,
            device="auto",
            repeats=3,
            threads=0,
            peak_matmul=0,
        )
    )  # 0: the device's default size
    if args["tiny"]:
        args.update(model="dit_s", latent_size=8, num_classes=10)
    device = device_of(args["device"])
    if args["threads"]:
        torch.set_num_threads(args["threads"])
    torch.backends.cuda.matmul.allow_tf32 = True
    with torch.inference_mode():
        names = all_samplers() if args["samplers"] == "all" else args["samplers"].split(",")
        # One tick per recording run and per repeat of each sampler: an ETA between the results.
        bar = progress_bar(len(names) * (1 + args["repeats"]), "samplers")
        for sampler in names:
            bar.set_postfix_str(sampler.strip())
            record = bench(args, sampler.strip(), device, bar.update)
            bar.clear()
            emit(record)
        bar.close()


if __name__ == "__main__":
    main()
