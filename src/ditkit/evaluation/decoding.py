"""From sampled latents to images: the VAE a run was trained with, and the scale its latents carry.

Training latents are `scale_factor * z` (the data manifest records the VAE and its scale); the
decoder divides by the scale and runs the VAE's decoder (identity in pixel space).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import torch

from ditkit.data.format import MANIFEST, parse_manifest
from ditkit.data.vae import IdentityVAE, load_vae, vae_from_manifest


def read_run_manifest(data: Mapping[str, Any]) -> dict | None:
    """The shard manifest named by a run's `data` config (data.manifest, else
    data.root/manifest.json), or None."""
    where = data.get("manifest") or (
        os.path.join(data["root"], MANIFEST) if data.get("root") else None
    )
    if where is None or not os.path.isfile(where):
        return None
    with open(where) as f:
        return parse_manifest(f.read(), where)


def run_vae(
    data: Mapping[str, Any],
    pretrained: str | None = None,
    subfolder: str | None = None,
    chosen: bool = False,
    override: str = "vae=sd_ft_ema vae.pretrained=DIR",
) -> torch.nn.Module:
    """The VAE of a ditkit run, from its `data` config.

    chosen=False (no `vae=` given): the manifest's VAE; without a readable manifest, the identity
    for the built-in digits (pixel space), else an error that says what to pass. chosen=True:
    `pretrained`
    (None: identity), with the manifest's scale factor when the manifest is readable. override:
    the setting that takes a local VAE folder (named when the hub cannot be reached).
    """
    manifest = read_run_manifest(data)
    if chosen:
        if pretrained is None or pretrained == "identity":
            return IdentityVAE(3)
        return (
            vae_from_manifest(manifest, pretrained, override)
            if manifest is not None
            else load_vae(pretrained, subfolder, override=override)
        )
    if manifest is not None:
        return vae_from_manifest(manifest, override=override)
    if data.get("builtin") == "digits":
        return IdentityVAE(3)
    raise FileNotFoundError(
        f"the checkpoint's data manifest ({data.get('manifest') or data.get('root')}) is not "
        "readable here, so its VAE "
        "is unknown: pass vae=sd_ft_ema (with vae.pretrained=<hub id or folder> for another one), or "
        "vae=identity for pixel space"
    )


def make_decoder(
    vae: torch.nn.Module, device: torch.device | str
) -> Callable[[torch.Tensor], torch.Tensor]:
    """latents (N, C, h, w) as the model samples them -> images (N, 3, H, W) in about [-1, 1], on
    `device`."""
    vae = vae.to(device).eval()
    scale = float(vae.scale_factor)

    @torch.no_grad()
    def decode(latents: torch.Tensor) -> torch.Tensor:
        images = vae.decode(latents.to(device) / scale)
        if images.shape[1] != 3:
            raise ValueError(
                f"the VAE gives {images.shape[1]}-channel images; FID needs RGB: pass the VAE the "
                "latents were made with"
            )
        return images

    return decode
