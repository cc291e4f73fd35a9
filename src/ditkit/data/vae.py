"""The autoencoders that map images to the latents DiT trains on, behind one small interface.

Both classes expose:
  - ``encode_moments(images: (N, 3, H, W) in [-1, 1]) -> (N, 2C, H/d, W/d)``: posterior mean ‖
    log-variance, unscaled (what the latent shards store);
  - ``decode(z: (N, C, h, w)) -> (N, 3, h*d, w*d)``: images, about [-1, 1] (not clamped), from
    *unscaled* latents, i.e. training latents divided by ``scale_factor``;
  - ``name``, ``scale_factor``, ``latent_channels``, ``downsample`` (d).

Training latents are ``scale_factor * z`` (Rombach et al. 2022, Sec. 4.3: 0.18215 for the SD VAEs
brings the latents to unit variance).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ditkit.offline import WeightsUnavailableError, hub_download_hint, is_network_error

IDENTITY = "identity"
# A log-variance this low makes the identity "posterior" a point mass: std = exp(-15) ~ 3e-7, far
# below the float16 step (~5e-4) of the stored pixels, and it matches the clamp diffusers applies to
# VAE log-variances.
IDENTITY_LOGVAR = -30.0


class IdentityVAE(nn.Module):
    """Pixel-space 'autoencoder': latents are the images themselves (scale 1, downsample 1)."""

    def __init__(self, channels: int = 3) -> None:
        super().__init__()
        self.name = IDENTITY
        self.scale_factor = 1.0
        self.latent_channels = channels
        self.downsample = 1

    @torch.no_grad()
    def encode_moments(self, images: torch.Tensor) -> torch.Tensor:
        """images: (N, C, H, W) in [-1, 1] -> (N, 2C, H, W): the image and a constant, very low
        log-variance."""
        return torch.cat([images, torch.full_like(images, IDENTITY_LOGVAR)], dim=1)

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z: (N, C, H, W) -> the same tensor (images)."""
        return z


class DiffusersVAE(nn.Module):
    """A diffusers ``AutoencoderKL`` with the interface above."""

    def __init__(
        self, autoencoder: nn.Module, name: str, scale_factor: float | None = None
    ) -> None:
        super().__init__()
        config = autoencoder.config
        if getattr(config, "shift_factor", None):
            raise ValueError(
                f"VAE {name!r} has shift_factor={config.shift_factor} (an SD3/FLUX-style VAE); the "
                "DiT latent format "
                "stores scale * z only. Use an SD-style VAE such as stabilityai/sd-vae-ft-ema."
            )
        self.autoencoder = autoencoder.eval().requires_grad_(False)
        self.name = name
        self.scale_factor = float(config.scaling_factor if scale_factor is None else scale_factor)
        self.latent_channels = int(config.latent_channels)
        self.downsample = 2 ** (len(config.block_out_channels) - 1)

    @torch.no_grad()
    def encode_moments(self, images: torch.Tensor) -> torch.Tensor:
        """images: (N, 3, H, W) in [-1, 1] -> (N, 2C, H/d, W/d) = posterior mean ‖ log-variance."""
        posterior = self.autoencoder.encode(images).latent_dist
        # mean/logvar rather than the raw `parameters`: diffusers clamps the log-variance to [-30,
        # 20].
        return torch.cat([posterior.mean, posterior.logvar], dim=1)

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z: (N, C, h, w) unscaled latents -> (N, 3, h*d, w*d) images, about [-1, 1]."""
        return self.autoencoder.decode(z).sample


def load_vae(
    pretrained: str | None,
    subfolder: str | None = None,
    scale_factor: float | None = None,
    channels: int = 3,
    override: str = "vae.pretrained=DIR",
) -> IdentityVAE | DiffusersVAE:
    """Load a VAE: a hub id or a local ``save_pretrained`` folder, or ``None`` / ``"identity"`` for
    pixel space.

    ``subfolder`` selects the VAE inside a whole pipeline repo (``"vae"``); ``scale_factor``
    overrides the config's ``scaling_factor``; ``channels`` is the image channel count of the
    identity VAE. ``override`` is how the caller's config takes a local folder: a hub id that
    cannot be fetched (no network) raises `WeightsUnavailableError` naming it.
    """
    if pretrained is None or pretrained == IDENTITY:
        return IdentityVAE(channels)
    from diffusers import AutoencoderKL

    # A hub id is "org/name"; anything that looks like a path must exist, rather than fall through
    # to the hub.
    if pretrained.startswith((".", "/", "~")) and not os.path.isdir(os.path.expanduser(pretrained)):
        raise FileNotFoundError(f"VAE folder {pretrained!r} does not exist ({override}).")
    try:
        autoencoder = AutoencoderKL.from_pretrained(
            os.path.expanduser(pretrained), subfolder=subfolder
        )
    except (OSError, ValueError) as err:
        if not os.path.isdir(os.path.expanduser(pretrained)) and is_network_error(err):
            raise WeightsUnavailableError(
                f"the VAE {pretrained!r} from the Hugging Face Hub",
                override,
                hub_download_hint(pretrained, subfolder),
                err,
            ) from err
        raise OSError(
            f"Could not load the VAE {pretrained!r}: {err}\nPass a hub id (e.g. "
            "stabilityai/sd-vae-ft-ema) or a "
            f"local folder written by diffusers `save_pretrained` ({override})."
        ) from err
    return DiffusersVAE(autoencoder, name=pretrained, scale_factor=scale_factor)


def vae_info(vae: IdentityVAE | DiffusersVAE) -> dict[str, Any]:
    """The manifest's description of a VAE (enough to load it again with `vae_from_manifest`)."""
    return {
        "name": vae.name,
        "scale_factor": vae.scale_factor,
        "latent_channels": vae.latent_channels,
        "downsample": vae.downsample,
    }


def vae_from_manifest(
    manifest: Mapping[str, Any],
    pretrained: str | None = None,
    override: str = "vae.pretrained=DIR",
) -> IdentityVAE | DiffusersVAE:
    """The VAE a shard set was made with, with the scale factor its latents were trained with.

    ``pretrained`` replaces the recorded name (e.g. a local copy of the hub weights on an offline
    cluster).
    """
    info = manifest["vae"]
    name = pretrained or info["name"]
    return load_vae(
        name,
        scale_factor=float(info["scale_factor"]),
        channels=int(info["latent_channels"]),
        override=override,
    )
