"""The CPU demonstration's frozen teacher: a tiny ViT that knows digit structure, built on first use.

REPA needs a self-supervised encoder whose patch features describe the image; the 16 px built-in
digits have none on the hub, so `digits_encoder` trains one (the `encoder=digits_vit` config): a
2-layer ViT (patch 4, so a 4 x 4 grid, the quickstart DiT's; 64 wide) with a linear head, as a
digits classifier on the 1,797 digits, seeded and single-threaded, so every machine builds the same
weights. It is saved with `save_pretrained` into the data folder beside the digits (renamed into
place when complete) and loaded from there as any other `FrozenEncoder`.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import torch
from torch import nn

from ditkit.models.encoders import FrozenEncoder, encoder_spec

from .samples import real_digits

NAME = "digits_vit"


def digits_encoder(
    root: str, steps: int = 400, precision: str = "fp32", progress: bool = True
) -> FrozenEncoder:
    """The digits teacher at `root` (a save_pretrained folder), trained there first if missing."""
    root = os.path.abspath(os.path.expanduser(root))
    if not os.path.isfile(os.path.join(root, "config.json")):
        build_digits_teacher(root, steps, progress)
    return FrozenEncoder(NAME, pretrained=root, precision=precision)


def build_digits_teacher(root: str, steps: int = 400, progress: bool = True) -> dict:
    """Train the tiny ViT classifier (Adam 1e-3, batch 128, `steps` steps, seed 0, one thread) and
    save its encoder at `root`; returns {"train_accuracy", "steps"} (also in root/teacher.json)."""
    from transformers import ViTConfig, ViTModel

    spec = encoder_spec(NAME)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same float sums in the same order on every machine
    try:
        torch.manual_seed(0)
        config = ViTConfig(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=128,
            image_size=spec.resolution,
            patch_size=4,
            num_channels=3,
        )
        net = ViTModel(config, add_pooling_layer=False)
        head = nn.Linear(config.hidden_size, 10)
        images, labels = real_digits(spec.resolution)  # (1797, 3, 16, 16) in [-1, 1]
        # The teacher sees what the shards store (uint8) through its own preprocessing.
        x = torch.from_numpy(np.round((images + 1) * 127.5).clip(0, 255).astype(np.uint8))
        mean = torch.tensor(spec.mean).view(1, 3, 1, 1)
        std = torch.tensor(spec.std).view(1, 3, 1, 1)
        x = (x.float() / 255 - mean) / std
        y = torch.from_numpy(np.asarray(labels)).long()
        opt = torch.optim.Adam([*net.parameters(), *head.parameters()], lr=1e-3)
        g = torch.Generator().manual_seed(0)
        for step in range(steps):
            idx = torch.randint(0, len(x), (128,), generator=g)
            logits = head(net(pixel_values=x[idx]).last_hidden_state[:, 0])
            loss = nn.functional.cross_entropy(logits, y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            if progress and (step + 1) % 100 == 0:
                print(
                    f"digits teacher: step {step + 1}/{steps}, loss {loss.item():.3f}", flush=True
                )
        net.eval()
        with torch.no_grad():
            predicted = head(net(pixel_values=x).last_hidden_state[:, 0]).argmax(1)
        info = {"train_accuracy": float((predicted == y).float().mean()), "steps": steps}
    finally:
        torch.set_num_threads(threads)
    tmp = f"{root}.building-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    net.save_pretrained(tmp)
    with open(os.path.join(tmp, "teacher.json"), "w") as f:
        json.dump(info, f)
    os.makedirs(os.path.dirname(root), exist_ok=True)
    try:
        os.rename(tmp, root)
    except OSError:  # another process published it first: same weights
        shutil.rmtree(tmp, ignore_errors=True)
    return info
