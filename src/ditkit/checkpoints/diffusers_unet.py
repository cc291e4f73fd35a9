"""ditkit UNet <-> diffusers `UNet2DModel`. ditkit's U-Net IS a UNet2DModel (`model.unet`) with
DiT's interface around it, so the weights map one to one (ditkit prefixes them `unet.`); the work
is reading ditkit's constructor arguments back out of a folder's config, strictly.
"""

from __future__ import annotations

import torch

from ditkit.models import UNet

CLASS_NAME = "UNet2DModel"
PREFIX = "unet."


def unet_to_diffusers(model: UNet, approximate: bool = False) -> tuple[dict, dict]:
    """A ditkit UNet -> (UNet2DModel config, its state_dict); exact (`approximate` is unused)."""
    config = {k: v for k, v in model.unet.config.items() if not k.startswith("_")}
    return config, model.unet.state_dict()


def unet_kwargs_from_diffusers(config: dict) -> dict:
    """UNet2DModel config -> ditkit UNet constructor arguments (checked against the config the
    ditkit U-Net builds, key by key, in `unet_from_diffusers`)."""
    downs = list(config["down_block_types"])
    if config.get("num_class_embeds") is None:
        raise ValueError(
            "num_class_embeds=None: ditkit's U-Net is class-conditional (num_classes + the null row)"
        )
    in_channels = config["in_channels"]
    out_channels = config.get("out_channels") or in_channels
    head_dim = config.get("attention_head_dim")
    return dict(
        input_size=config["sample_size"],
        in_channels=in_channels,
        num_classes=config["num_class_embeds"] - 1,
        learn_sigma=out_channels == 2 * in_channels,
        block_out_channels=tuple(config["block_out_channels"]),
        layers_per_block=config["layers_per_block"],
        attention_levels=tuple(i for i, name in enumerate(downs) if name.startswith("Attn")),
        attention_head_dim=8 if head_dim is None else head_dim,
        norm_num_groups=config["norm_num_groups"],
    )


def unet_from_diffusers(config: dict, state: dict[str, torch.Tensor], **overrides) -> UNet:
    """Build the ditkit UNet of a UNet2DModel config; every config key must come out the same, and
    the weights load strictly."""
    model = UNet(**{**unet_kwargs_from_diffusers(config), **overrides})
    check_unet_config(config, model)
    model.load_state_dict(unet_state_from_diffusers(state), strict=True)
    return model


def check_unet_config(config: dict, model: UNet) -> None:
    """Raise naming every UNet2DModel config key whose value the ditkit U-Net does not build."""
    ours = model.unet.config
    bad = [
        f"{k}={config[k]!r} (ditkit's U-Net builds {ours[k]!r})"
        for k in config
        if not k.startswith("_") and k in ours and _norm(config[k]) != _norm(ours[k])
    ]
    if bad:
        raise ValueError(
            "this UNet2DModel cannot be represented by ditkit's U-Net: " + "; ".join(bad)
        )


def unet_state_from_diffusers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {PREFIX + k: v for k, v in state.items()}


def _norm(value):
    """Config values compare alike whether JSON gave a list or diffusers a tuple."""
    return list(value) if isinstance(value, (list, tuple)) else value
