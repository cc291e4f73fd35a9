"""Sampling callbacks: a periodic image grid from the EMA model, and the quickstart's digits score.

Both take a sampler setting of the one shape used everywhere (`ditkit.objectives.samplers.resolve`):
null, a registered name, or {name, steps, options}; null parts mean the objective's cheap "preview"
sampler (ddim for ddpm, euler for flow) at its registered default steps.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from PIL import Image

from ditkit.checkpoints.atomic import atomic_write
from ditkit.objectives.samplers import resolve

SamplerSetting = str | Mapping[str, Any] | None


def fixed_inputs(
    num: int, shape: tuple[int, int, int], labels: list[int], seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same noise (num, C, H, W) and labels (num,) at every call: labels cycle through
    `labels`."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn((num, *shape), generator=g)
    y = torch.tensor([labels[i % len(labels)] for i in range(num)], dtype=torch.int64)
    return noise, y


GUTTER = 2  # px of mid-grey between grid cells: dark-background samples (digits) stay apart
GUTTER_VALUE = 128


def to_grid(images: torch.Tensor, nrow: int | None = None, gutter: int = GUTTER) -> np.ndarray:
    """images: (N, C, H, W) in about [-1, 1] -> (rows*H + (rows-1)*gutter, nrow*W +
    (nrow-1)*gutter, 3) uint8, row-major, cells separated by `gutter` px of grey."""
    n, c, h, w = images.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    x = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    if c == 1:
        x = x.expand(-1, 3, -1, -1)
    step_h, step_w = h + gutter, w + gutter
    grid = torch.full(
        (3, rows * step_h - gutter, nrow * step_w - gutter), GUTTER_VALUE, dtype=torch.uint8
    )
    for i in range(n):
        r, col = divmod(i, nrow)
        grid[:, r * step_h : r * step_h + h, col * step_w : col * step_w + w] = x[i, :3]
    return grid.permute(1, 2, 0).numpy()


def save_png(path: Path, grid: np.ndarray) -> None:
    """grid: (H, W, 3) uint8 -> a PNG at `path`, written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as f:
        Image.fromarray(grid).save(f, format="PNG")


def _decoder(trainer: L.Trainer, vae: str | None):
    """latents (N, C, h, w) scaled -> images (N, 3, H, W): the VAE named by the shards' manifest
    (`vae` replaces its name, e.g. a local copy on an offline cluster)."""
    from ditkit.data.vae import vae_from_manifest

    datamodule = trainer.datamodule
    datamodule.setup()
    model = vae_from_manifest(datamodule.manifest, vae, "callbacks.sample_grid.vae=DIR").eval()
    scale = datamodule.scale_factor

    def decode(latents: torch.Tensor) -> torch.Tensor:
        model.to(latents.device)
        return model.decode(latents / scale)

    return decode


def conditions(
    trainer: L.Trainer,
    model: torch.nn.Module,
    labels: torch.Tensor,
    prompts: list[str] | None = None,
) -> dict[str, torch.Tensor]:
    """The backbone's condition for `labels` (N,): {"y": labels} for a class-conditional backbone;
    for a text backbone (MMDiT) the {"context", "pooled"} embeddings of `prompts` (cycled over the
    labels' positions) or else of the labels' class captions, by the text encoders that the shards'
    manifest names."""
    keys = tuple(model.condition_keys)
    if keys == ("y",):
        return {"y": labels}
    if set(keys) != {"context", "pooled"}:
        raise ValueError(
            f"sample grids condition on class labels ('y') or text ('context', 'pooled'); "
            f"{type(model).__name__} takes {list(keys)}"
        )
    from ditkit.data.text import class_prompts, text_encoders_from_manifest

    datamodule = trainer.datamodule
    datamodule.setup()
    if prompts:
        texts = [prompts[i % len(prompts)] for i in range(len(labels))]
    else:
        texts = class_prompts(datamodule.manifest, labels)
    context, pooled = text_encoders_from_manifest(datamodule.manifest)(texts)
    return {"context": context, "pooled": pooled}


def sample_in_chunks(
    pl_module: L.LightningModule,
    noise: torch.Tensor,
    condition: dict[str, torch.Tensor],
    sampler: SamplerSetting,
    cfg_scale: float,
    batch_size: int,
) -> torch.Tensor:
    """EMA samples (N, C, H, W) float32 in chunks on the module's device, from fixed inputs; the
    global RNG is left as it was."""
    spec, steps, options = resolve(sampler, pl_module.objective.name, "preview")
    out = []
    device = pl_module.device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(
            0
        )  # stochastic samplers (ancestral DDPM, SDE) draw the same noise each time
        for i in range(0, len(noise), batch_size):
            x = noise[i : i + batch_size].to(device)
            chunk = {k: v[i : i + batch_size].to(device) for k, v in condition.items()}
            out.append(
                pl_module.sample(
                    x, chunk, sampler=spec.name, steps=steps, cfg_scale=cfg_scale, **options
                ).float()
            )
    return torch.cat(out)


class SampleGrid(Callback):
    """Every `every_n_steps` optimizer steps: sample a grid with the EMA model from fixed labels and
    noise, write <run>/samples/step_XXXXXXX.png and log it as `samples` to loggers that take images
    (W&B).

    labels: the classes to show (cycled); default `num_images` classes spread over [0, num_classes).
    prompts: for a text backbone, the captions to show (cycled); default the labels' class captions.
    sampler: null | name | {name, steps, options} (default: the objective's preview sampler).
    vae: override of the manifest's VAE.
    """

    def __init__(
        self,
        every_n_steps: int = 10000,
        num_images: int = 16,
        num_classes: int = 1000,
        labels: list[int] | None = None,
        sampler: SamplerSetting = None,
        cfg_scale: float = 4.0,
        seed: int = 0,
        batch_size: int = 64,
        vae: str | None = None,
        output_dir: str | None = None,
        prompts: list[str] | None = None,
    ):
        if every_n_steps < 1:
            raise ValueError(
                f"callbacks.sample_grid.every_n_steps must be >= 1, got {every_n_steps}"
            )
        self.every_n_steps = every_n_steps
        self.num_images = num_images
        self.cfg_scale = cfg_scale
        if labels:
            self.labels = list(labels)
        else:
            self.labels = [int(i * num_classes / num_images) for i in range(num_images)]
        self.sampler = sampler
        self.seed = seed
        self.batch_size = batch_size
        self.vae = vae
        self.output_dir = output_dir
        self.prompts = list(prompts) if prompts else None
        self._decode = None
        self._condition = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        resolve(self.sampler, pl_module.objective.name, "preview")  # a bad setting fails now
        # The VAE and text encoders load now: weights that cannot be fetched fail before training.
        model = pl_module.model
        _, labels = fixed_inputs(self.num_images, (1, 1, 1), self.labels, self.seed)
        self._condition = conditions(trainer, model, labels, self.prompts)
        if trainer.is_global_zero:
            self._decode = _decoder(trainer, self.vae)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        stepped = (batch_idx + 1) % trainer.accumulate_grad_batches == 0
        if step == 0 or step % self.every_n_steps or not stepped:
            return
        model = pl_module.model
        shape = (model.in_channels, model.input_size, model.input_size)
        noise, labels = fixed_inputs(self.num_images, shape, self.labels, self.seed)
        if self._condition is None:
            self._condition = conditions(trainer, model, labels, self.prompts)
        latents = sample_in_chunks(
            pl_module, noise, self._condition, self.sampler, self.cfg_scale, self.batch_size
        )
        if not trainer.is_global_zero:
            return  # every rank samples (FSDP2 all-gathers in the forward); rank 0 decodes, logs
        if self._decode is None:
            self._decode = _decoder(trainer, self.vae)
        grid = to_grid(self._decode(latents))
        folder = Path(self.output_dir or Path(trainer.default_root_dir) / "samples")
        save_png(folder / f"step_{step:07d}.png", grid)
        if self.prompts and "y" not in self._condition:
            caption = f"prompts {self.prompts}"
        else:
            caption = f"labels {self.labels}"
        for logger in trainer.loggers:
            if hasattr(logger, "log_image"):
                logger.log_image(key="samples", images=[grid], step=step, caption=[caption])


def real_digits(image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits exactly as the built-in data set stores them: (1797, 3, S, S) in
    [-1, 1], and their labels."""
    from ditkit.data.images import center_crop_arr, to_rgb, to_tensor
    from ditkit.data.sources import DigitsSource

    source = DigitsSource()
    images = [
        to_tensor(center_crop_arr(to_rgb(Image.fromarray(a)), image_size)).numpy()
        for a in source.images
    ]
    return np.stack(images), source.labels


def digits_features(images: np.ndarray) -> np.ndarray:
    """(N, C, S, S) in [-1, 1] -> (N, S*S) grayscale features, clipped to the pixel range."""
    return np.clip(images, -1, 1).mean(axis=1).reshape(len(images), -1)


class DigitsScore(Callback):
    """At the end of training (built-in digits only): sample `per_class` images of each digit with
    the EMA model and guidance (a text backbone: prompted "a handwritten <digit>"), and report the
    share that an SVM trained on the real digits assigns to the class that was asked for
    (`samples/digits_accuracy`, also written to <run>/digits_score.json).

    sampler: null | name | {name, steps, options} (default: the objective's preview sampler)."""

    def __init__(
        self,
        per_class: int = 20,
        cfg_scale: float = 4.0,
        sampler: SamplerSetting = None,
        seed: int = 0,
        batch_size: int = 200,
    ):
        self.per_class = per_class
        self.cfg_scale = cfg_scale
        self.sampler = sampler
        self.seed = seed
        self.batch_size = batch_size

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        resolve(self.sampler, pl_module.objective.name, "preview")  # a bad setting fails now

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step < trainer.max_steps:
            return  # stopped early (preemption): score the finished run instead
        from sklearn.svm import SVC

        model = pl_module.model
        size = model.input_size
        shape = (model.in_channels, size, size)
        noise, labels = fixed_inputs(10 * self.per_class, shape, list(range(10)), self.seed)
        condition = conditions(trainer, model, labels)  # text: "a handwritten seven" for 7
        start = time.perf_counter()
        samples = sample_in_chunks(
            pl_module, noise, condition, self.sampler, self.cfg_scale, self.batch_size
        )
        sampling_seconds = time.perf_counter() - start
        if not trainer.is_global_zero:
            return
        images, targets = real_digits(size)
        classifier = SVC().fit(digits_features(images), targets)
        predicted = classifier.predict(digits_features(samples.cpu().numpy()))
        correct = predicted == labels.numpy()
        result = {
            "accuracy": float(correct.mean()),
            "per_class": [float(correct[labels.numpy() == c].mean()) for c in range(10)],
            "num_samples": len(correct),
            "cfg_scale": self.cfg_scale,
            "step": trainer.global_step,
            "sampling_seconds": round(sampling_seconds, 2),  # all 10 x per_class samples, guided
        }
        root = Path(trainer.default_root_dir)
        root.mkdir(parents=True, exist_ok=True)
        with atomic_write(root / "digits_score.json", "w") as f:
            json.dump(result, f, indent=2)
        # Labels cycle 0..9: column c holds digit c.
        save_png(root / "digits_samples.png", to_grid(samples[:100], nrow=10))
        for logger in trainer.loggers:
            logger.log_metrics(
                {"samples/digits_accuracy": result["accuracy"]}, step=trainer.global_step
            )
        rank_zero_info(
            f"digits score: {result['accuracy']:.1%} of {len(correct)} guided samples (cfg "
            f"{self.cfg_scale}) are classified as the digit asked for by an SVM trained on the "
            "real digits"
        )
