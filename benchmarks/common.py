"""Helpers shared by the benchmark scripts: key=value arguments, timing, peak FLOP/s and memory."""

import json
import resource
import statistics
import sys
import time

import torch

from ditkit.training.throughput import peak_flops

PRECISIONS = {"32-true": None, "bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


def parse_args(defaults: dict) -> dict:
    """`key=value` arguments (Hydra style) over `defaults`, each cast to the default's type."""
    args = dict(defaults)
    if any(item in ("-h", "--help") for item in sys.argv[1:]):
        doc = (sys.modules["__main__"].__doc__ or "").strip()
        keys = " ".join(f"{k}={v}" for k, v in defaults.items())
        print(f"{doc}\n\nArguments (key=value, defaults shown): {keys}")
        raise SystemExit(0)
    for item in sys.argv[1:]:
        key, sep, value = item.partition("=")
        if not sep or key not in defaults:
            raise SystemExit(
                f"unknown argument {item!r}; valid: {', '.join(f'{k}=' for k in defaults)}"
            )
        default = defaults[key]
        if isinstance(default, bool):
            args[key] = value.lower() in ("1", "true", "yes")
        elif default is None:
            args[key] = value
        else:
            args[key] = type(default)(value)
    if args.get("precision") is not None and args["precision"] not in PRECISIONS:
        raise SystemExit(f"precision={args['precision']!r}; valid: {', '.join(PRECISIONS)}")
    return args


def device_of(name: str) -> torch.device:
    return torch.device(
        "cuda"
        if name == "auto" and torch.cuda.is_available()
        else ("cpu" if name == "auto" else name)
    )


def progress_bar(total: int, desc: str):
    """A tqdm bar with rate and ETA on stderr (stdout carries the JSON lines), so a benchmark that
    runs for minutes shows where it is between its results."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, file=sys.stderr, dynamic_ncols=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(
    fn, steps: int, warmup: int, device: torch.device, desc: str | None = None
) -> list[float]:
    """Seconds of each of `steps` calls of fn after `warmup` untimed ones; with `desc`, a progress
    bar over all of them."""
    bar = progress_bar(warmup + steps, desc) if desc else None
    for _ in range(warmup):
        fn()
        if bar is not None:
            bar.update()
    sync(device)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
        if bar is not None:
            bar.update()
    if bar is not None:
        bar.close()
    return times


def matmul_peak_flops(
    device: torch.device, dtype: torch.dtype, n: int | None = None, reps: int = 5
) -> float:
    """Achievable dense FLOP/s measured on the spot: the best of `reps` n x n matmuls in `dtype`."""
    n = n or (8192 if device.type == "cuda" else 2048)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = min(time_calls(lambda: a @ b, reps, 2, device))
    return 2 * n**3 / best


def nominal_peak_flops(device: torch.device, precision: str) -> float | None:
    """The datasheet's dense peak FLOP/s of the detected GPU for a 16-bit `precision` (the table
    of ditkit.training.throughput, which training's perf/mfu uses), None on CPU, in fp32 or for an
    unknown GPU. FP8 training is counted against this 16-bit peak too (as torchtitan does)."""
    if device.type != "cuda":
        return None
    return peak_flops(torch.cuda.get_device_name(device), precision)


def mfu_fields(flops_per_sec: float, measured_peak: float, nominal_peak: float | None) -> dict:
    """MFU both ways, named: `mfu` against the matmul measured in the same process
    (`peak_gflops`), `mfu_nominal` against the datasheet peak of the detected GPU
    (`nominal_peak_gflops`; null where there is none, e.g. on a CPU)."""
    return dict(
        peak_gflops=sig(measured_peak / 1e9),
        mfu=sig(flops_per_sec / measured_peak),
        nominal_peak_gflops=None if nominal_peak is None else sig(nominal_peak / 1e9),
        mfu_nominal=None if nominal_peak is None else sig(flops_per_sec / nominal_peak),
    )


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return (
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )  # Linux reports KiB; whole process


def sig(x: float, digits: int = 6) -> float:
    """x to `digits` significant digits: rounding to a fixed number of decimals would lose all of a
    small number (a 1.3 GFLOP/s bf16 peak on a CPU without bf16 units) and keep noise in a big
    one."""
    return float(f"{x:.{digits}g}")


def summarize(times: list[float]) -> float:
    return statistics.median(times)


def emit(record: dict) -> None:
    """One JSON line on stdout (the last line is what scripts and tests read)."""
    print(json.dumps(record), flush=True)
