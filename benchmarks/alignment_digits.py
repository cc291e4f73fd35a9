"""Representation alignment on the built-in digits, on CPU: the quickstart with and without REPA /
iREPA / REG, same seed, same steps, scored at several step counts.

    python benchmarks/alignment_digits.py steps=250,500,1000 variants=none,repa,reg

Each variant is `python train.py experiment=quickstart` (DiT depth 4, width 128, patch 4: a 4 x 4
token grid) plus its overrides; alignment uses `encoder=digits_vit`, the tiny ViT digits classifier
built on first use into the data folder (ditkit.training.digits_teacher), on block
`depth` (default 2 of 4: REPA's 8 of 28, rounded) with a projector `projector_dim` wide (default
512: REPA's 2048 for width 1152, scaled down). One run folder per variant, trained to the first step
count, then resumed (exactly) to the next. REG (alignment=reg) adds the teacher's class token,
denoised with the image and integrated with it at sampling (its EMA embedding and head). At each
step count the EMA weights draw `per_class`
guided samples of each digit (Euler, 30 steps, cfg 4, the quickstart's DigitsScore setting) and are
scored as benchmarks/few_step.py scores them: the SVM digits accuracy and the Frechet distance to
the real digits in grayscale pixel space. Also the training seconds per variant. A table, then one
JSON line per (variant, steps).

Whether alignment helps a 4-block DiT on 16 px digits is an open question: report what it measures.
"""

import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from common import emit, parse_args, sig
from few_step import load, pixel_stats, score

from ditkit.training.samples import digits_features, real_digits

REPO = Path(__file__).resolve().parents[1]


def variant_overrides(name: str, depth: int, projector_dim: int) -> list[str]:
    if name == "none":
        return []
    if name == "repa":
        return [
            "encoder=digits_vit",
            "alignment=repa",
            f"alignment.depth={depth}",
            f"alignment.projector_dim={projector_dim}",
        ]
    if name == "irepa":
        return ["encoder=digits_vit", "alignment=irepa", f"alignment.depth={depth}"]
    if name == "reg":  # REPA's settings plus the class token (cls_weight 0.03; EMA heads)
        return [
            "encoder=digits_vit",
            "alignment=reg",
            f"alignment.depth={depth}",
            f"alignment.projector_dim={projector_dim}",
        ]
    raise SystemExit(f"variants: choose from none, repa, irepa, reg (got {name!r})")


def train(out: Path, name: str, steps: int, extra: list[str], seed: int) -> float:
    """train.py to `steps` in run folder out/<name> (resuming it); returns the seconds it took."""
    cmd = [
        sys.executable,
        str(REPO / "train.py"),
        "experiment=quickstart",
        *extra,
        f"seed={seed}",
        f"run_name={name}",
        f"paths.output_dir={out}",
        f"paths.data_dir={out / 'data'}",  # digits with images, and the teacher, built here once
        f"trainer.max_steps={steps}",
        "logger=csv",
        "~callbacks.sample_grid",
        "~callbacks.digits_score",  # scored here, with the same sampler and guidance
        "~callbacks.progress",
        "trainer.enable_progress_bar=false",
    ]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}")
    return time.perf_counter() - start


def main() -> None:
    args = parse_args(
        dict(
            steps="250,500,1000",
            variants="none,repa,reg",
            depth=2,
            projector_dim=512,
            per_class=50,
            cfg_scale=4.0,
            seed=0,
            out="outputs/alignment_digits",
        )
    )
    from sklearn.svm import SVC

    torch.set_num_threads(1)
    out = Path(os.path.abspath(args["out"]))
    steps = [int(s) for s in str(args["steps"]).split(",")]
    real, targets = real_digits(16)
    classifier = SVC().fit(digits_features(real), targets)
    real_stats = pixel_stats(real)
    records = []
    for name in str(args["variants"]).split(","):
        extra = variant_overrides(name, args["depth"], args["projector_dim"])
        seconds = 0.0
        for target in steps:
            print(f"{name}: training to step {target} ...", file=sys.stderr, flush=True)
            seconds += train(out, name, target, extra, args["seed"])
            model, objective = load(str(out / name / "checkpoints" / "last.ckpt"))
            r = score(model, objective, "euler", 30, args, classifier, real_stats)
            records.append(
                dict(
                    variant=name,
                    train_steps=target,
                    accuracy=r["accuracy"],
                    fd_pixels=r["fd_pixels"],
                    num_samples=r["num_samples"],
                    train_seconds=sig(seconds),
                    overrides=" ".join(extra),
                )
            )
            print(records[-1], file=sys.stderr, flush=True)  # kept if a later variant fails
    print(
        "| variant | steps | digits accuracy | FD (pixels) | train s (cumulative, incl. start-up) |"
    )
    print("| --- | --- | --- | --- | --- |")
    for r in records:
        print(
            f"| {r['variant']} | {r['train_steps']} | {r['accuracy']:.1%} | {r['fd_pixels']} | "
            f"{r['train_seconds']} |"
        )
    for r in records:
        emit(r)


if __name__ == "__main__":
    main()
