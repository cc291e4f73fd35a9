"""Few-step sampling against DDPM-250 on the quickstart digits: quality and speed of each sampler.

    python train.py experiment=quickstart                                   # rectified flow
    python train.py experiment=quickstart objective=ddpm model.learn_sigma=true \\
        callbacks.digits_score.sampler.name=ddpm callbacks.digits_score.sampler.steps=250  # DiT's DDPM recipe
    python benchmarks/few_step.py flow_ckpt=outputs/experiment-quickstart/checkpoints/last.ckpt \\
        ddpm_ckpt=outputs/experiment-quickstart+model.learn_sigma-true+objective-ddpm/checkpoints/last.ckpt

For each `settings` entry (objective:sampler:steps; by default 10, 20, 50 and 250 network calls of
each objective, the diffusers solvers dpmpp_2m, unipc and unipc_flow included), `per_class` guided
samples of each digit from that objective's checkpoint (EMA weights), scored two ways: `accuracy`,
the share an SVM trained on the real digits assigns to the digit asked for (as the quickstart's
DigitsScore), and `fd_pixels`, the Frechet distance between the samples and the 1,797 real digits
in grayscale pixel space (16 x 16 = 256 features). That is FID's formula without Inception: the
Inception weights cannot be downloaded here, and they were made for 299 px photographs, not 16 px
digits. Also reported: model evaluations (NFE), seconds and images/s. A table, then one JSON line per setting.
"""

import time

import numpy as np
import torch
from common import emit, parse_args, progress_bar, sig
from hydra.utils import instantiate
from omegaconf import OmegaConf
from sample import CountingModel

from ditkit.checkpoints import read_checkpoint
from ditkit.evaluation.objective_terms import sampling_objective
from ditkit.evaluation.stats import frechet_distance
from ditkit.training.samples import digits_features, fixed_inputs, real_digits


def load(path: str):
    """EMA model and objective of a ditkit checkpoint, built from the run's own config."""
    ckpt = read_checkpoint(path, "ema")
    if ckpt.kind != "ditkit":
        raise SystemExit(
            f"{path} is a {ckpt.kind} checkpoint; pass one written by train.py (it holds the run's config)"
        )
    cfg = OmegaConf.create(ckpt.run_config)
    cfg.model.pop(
        "grad_checkpointing", None
    )  # ditkit 0.1 checkpoints name it; applied from outside now
    cfg.model.pop("pretrained", None)  # the checkpoint's weights replace the starting folder's
    model = instantiate(cfg.model)
    model.load_state_dict(ckpt.state_dict)
    # Only the terms sampling needs (REG's class-token heads), with their checkpointed weights.
    return model.eval(), sampling_objective(cfg.objective, model, ckpt.terms, path)


def pixel_stats(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    feats = digits_features(images).astype(np.float64)
    return feats.mean(axis=0), np.cov(feats, rowvar=False)


@torch.inference_mode()
def score(model, objective, sampler: str, steps: int, args: dict, classifier, real_stats) -> dict:
    size = model.input_size
    noise, labels = fixed_inputs(
        10 * args["per_class"], (model.in_channels, size, size), list(range(10)), args["seed"]
    )
    counter = CountingModel(model)
    torch.manual_seed(args["seed"])  # the ancestral DDPM and SDE samplers draw noise
    start = time.perf_counter()
    samples = objective.sample(
        counter, noise, {"y": labels}, sampler=sampler, steps=steps, cfg_scale=args["cfg_scale"]
    )
    seconds = time.perf_counter() - start
    images = samples.float().clamp(-1, 1).numpy()
    accuracy = float((classifier.predict(digits_features(images)) == labels.numpy()).mean())
    mu, sigma = pixel_stats(images)
    return dict(
        objective=objective.name,
        sampler=sampler,
        steps=steps,
        nfe=len(counter.batches),
        num_samples=len(images),
        cfg_scale=args["cfg_scale"],
        accuracy=round(accuracy, 4),
        fd_pixels=round(float(frechet_distance(mu, sigma, *real_stats)), 3),
        seconds=sig(seconds),
        imgs_per_sec=sig(len(images) / seconds),
    )


def main() -> None:
    args = parse_args(
        dict(
            flow_ckpt=None,
            ddpm_ckpt=None,
            # Network calls 10, 20, 50 and 250 for each objective (Heun takes 2 per step).
            settings="ddpm:ddpm:250,ddpm:ddim:10,ddpm:ddim:20,ddpm:ddim:50,"
            "ddpm:dpmpp_2m:10,ddpm:dpmpp_2m:20,ddpm:dpmpp_2m:50,"
            "ddpm:unipc:10,ddpm:unipc:20,ddpm:unipc:50,"
            "flow:sde:250,flow:euler:250,flow:euler:10,flow:euler:20,flow:euler:50,"
            "flow:heun:5,flow:heun:10,flow:heun:25,"
            "flow:unipc_flow:10,flow:unipc_flow:20,flow:unipc_flow:50",
            per_class=100,
            cfg_scale=4.0,
            seed=0,
            threads=0,
        )
    )
    if args["threads"]:
        torch.set_num_threads(args["threads"])
    from sklearn.svm import SVC

    settings = [entry.split(":") for entry in args["settings"].split(",")]
    paths = {"flow": args["flow_ckpt"], "ddpm": args["ddpm_ckpt"]}
    for objective_name, _, _ in settings:
        if paths.get(objective_name) is None:
            raise SystemExit(
                f"settings name objective {objective_name!r}: pass {objective_name}_ckpt=PATH"
            )
    loaded = {name: load(path) for name, path in paths.items() if path is not None}
    real, targets = real_digits(next(iter(loaded.values()))[0].input_size)
    classifier = SVC().fit(digits_features(real), targets)
    real_stats = pixel_stats(real)
    records = []
    bar = progress_bar(len(settings), "settings")  # rate and ETA between the results
    for objective_name, sampler, steps in settings:
        model, objective = loaded[objective_name]
        if objective.name != objective_name:
            raise SystemExit(
                f"{paths[objective_name]} was trained with {objective.name}, not {objective_name}"
            )
        bar.set_postfix_str(f"{objective_name} {sampler}-{steps}")
        records.append(score(model, objective, sampler, int(steps), args, classifier, real_stats))
        bar.update()
    bar.close()
    print("| objective | sampler | steps | NFE | digits accuracy | FD (pixels) | images/s |")
    for r in sorted(records, key=lambda r: (r["objective"], r["nfe"])):
        print(
            f"| {r['objective']} | {r['sampler']} | {r['steps']} | {r['nfe']} | {r['accuracy']:.1%} | "
            f"{r['fd_pixels']} | {r['imgs_per_sec']} |"
        )
    for r in records:
        emit(r)


if __name__ == "__main__":
    main()
