"""Frozen vision encoders (DINOv2, DINOv3, SigLIP 2, MAE, ...) as teachers: the patch-token
features that representation alignment (REPA, iREPA, REG) pulls a DiT's hidden states towards, and
the feature space of Frechet distances such as FD-DINOv2.

An encoder is loaded with transformers from `pretrained` (a hub id or a local `save_pretrained`
folder), frozen (no grad, eval mode) and kept out of every `nn.Module` tree on purpose: it is not
trained, not sharded, not in the EMA and not in any checkpoint. It moves to the images' device on
first use and runs there, inside the training step (bf16 autocast on CUDA), never in the loader.

Preprocessing follows REPA's `preprocess_raw_image` (sihyun-yu/REPA, train.py): uint8 -> [0, 1],
bicubic resize to the encoder's resolution (256 -> 224 for DINOv2: a 16 x 16 grid of 14 px
patches, the grid of XL/2 on 32 x 32 latents), the encoder's mean / std. The features are the last
layer's normalised tokens (REPA reads DINOv2's `x_norm_patchtokens`): patch tokens without the
class token and registers, and the class token (REG's extra token) separately.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class EncoderSpec:
    """hub_id: the default `pretrained`; resolution: the square input size (REPA: 224 for
    DINOv2 at 256 px); mean, std: the encoder's input normalisation."""

    hub_id: str
    resolution: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    description: str = ""


ENCODERS: dict[str, EncoderSpec] = {
    "dinov2_s": EncoderSpec("facebook/dinov2-small", 224, description="DINOv2 ViT-S/14"),
    "dinov2_b": EncoderSpec("facebook/dinov2-base", 224, description="DINOv2 ViT-B/14 (REPA)"),
    "dinov2_l": EncoderSpec("facebook/dinov2-large", 224, description="DINOv2 ViT-L/14"),
    "dinov3_l": EncoderSpec(
        "facebook/dinov3-vitl16-pretrain-lvd1689m", 256, description="DINOv3 ViT-L/16"
    ),
    "siglip2_b": EncoderSpec(
        "google/siglip2-base-patch16-256", 256, HALF, HALF, description="SigLIP 2 B/16 at 256"
    ),
    # REPA feeds MAE the 256 px image (16 x 16 patches of 16 px), interpolating the positions.
    "mae_b": EncoderSpec("facebook/vit-mae-base", 256, description="MAE ViT-B/16"),
    # The CPU demonstration's teacher: a tiny ViT trained as a digits classifier, built on first
    # use into the data folder (ditkit.data.digits_encoder); pretrained= is that folder.
    "digits_vit": EncoderSpec("", 16, HALF, HALF, description="tiny digits ViT (CPU demo)"),
}


def encoder_spec(name: str) -> EncoderSpec:
    if name not in ENCODERS:
        raise ValueError(f"unknown encoder {name!r}; registered: {', '.join(sorted(ENCODERS))}")
    return ENCODERS[name]


@dataclass
class EncoderFeatures:
    """patches: (N, T, D) float32, T = grid ** 2 in raster order; cls: (N, D) float32 (the class
    token, SigLIP: its pooled head output)."""

    patches: torch.Tensor
    cls: torch.Tensor


class FrozenEncoder:
    """A frozen vision encoder from `ENCODERS` (the config group `encoder=`).

    name: the registry entry (its preprocessing and default weights); pretrained: a hub id or a
    local save_pretrained folder (default the entry's hub id); resolution: the input size (default
    the entry's); precision: "bf16" autocasts the forward on CUDA (CPU always runs float32, which
    has no bf16 hardware on most machines)."""

    def __init__(
        self,
        name: str,
        pretrained: str | None = None,
        resolution: int | None = None,
        precision: str = "bf16",
    ) -> None:
        spec = encoder_spec(name)
        if precision not in ("bf16", "fp32"):
            raise ValueError(f"encoder.precision={precision!r}; choose bf16 or fp32")
        self.name, self.spec, self.precision = name, spec, precision
        self.pretrained = pretrained or spec.hub_id
        self.resolution = int(resolution or spec.resolution)
        self.net = load_pretrained(self.pretrained, name)
        config = self.net.config
        self.model_type = config.model_type
        self.patch_size = int(config.patch_size)
        self.dim = int(config.hidden_size)
        if self.resolution % self.patch_size:
            raise ValueError(
                f"encoder.resolution={self.resolution} is not a multiple of the {name} patch size "
                f"{self.patch_size}"
            )
        self.grid = self.resolution // self.patch_size
        # Tokens before the patches: the class token and registers (SigLIP has neither).
        registers = int(getattr(config, "num_register_tokens", 0) or 0)
        self.num_prefix = 0 if self.model_type.startswith("siglip") else 1 + registers
        self.mean = torch.tensor(spec.mean).view(1, 3, 1, 1)
        self.std = torch.tensor(spec.std).view(1, 3, 1, 1)

    def __deepcopy__(self, memo: dict) -> FrozenEncoder:
        # One frozen teacher however often the terms holding it are copied (the EMA's shadow).
        return self

    def __repr__(self) -> str:
        return f"FrozenEncoder({self.name}, {self.pretrained!r}, grid {self.grid}, dim {self.dim})"

    def preprocess(self, image: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) uint8 -> (N, 3, R, R) float32, resized (bicubic) and normalised."""
        if image.dtype != torch.uint8 or image.ndim != 4 or image.shape[1] != 3:
            raise ValueError(
                f"encoders read (N, 3, H, W) uint8 images, got {image.dtype} {tuple(image.shape)}"
            )
        x = image.float() / 255.0
        if x.shape[-2:] != (self.resolution, self.resolution):
            x = F.interpolate(x, size=(self.resolution,) * 2, mode="bicubic", align_corners=False)
        return (x - self.mean.to(x.device)) / self.std.to(x.device)

    @torch.no_grad()
    def __call__(self, image: torch.Tensor) -> EncoderFeatures:
        """(N, 3, H, W) uint8 -> the last layer's normalised patch tokens and class token."""
        x = self.preprocess(image)
        if next(self.net.parameters()).device != x.device:
            self.net.to(x.device)
        cuda = x.device.type == "cuda" and self.precision == "bf16"
        autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
        )
        with autocast:
            tokens, pooled = self._forward(x)
        patches = tokens[:, self.num_prefix :].float()
        if patches.shape[1] != self.grid**2:
            raise ValueError(
                f"{self.name} gave {patches.shape[1]} patch tokens, expected {self.grid}^2"
            )
        cls = (pooled if pooled is not None else tokens[:, 0]).float()
        return EncoderFeatures(patches, cls)

    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(all tokens (N, prefix + T, D), a pooled vector (N, D) where the model has no class
        token)."""
        if self.model_type == "vit_mae":
            # No masking, and the identity shuffle (argsort of increasing noise): tokens stay in
            # raster order.
            n, t = x.shape[0], self.grid**2
            noise = torch.arange(t, device=x.device, dtype=torch.float32).expand(n, t)
            out = self.net(pixel_values=x, noise=noise, interpolate_pos_encoding=True)
            return out.last_hidden_state, None
        if self.model_type.startswith("siglip") or self.model_type == "vit":
            out = self.net(pixel_values=x, interpolate_pos_encoding=True)
            pooled = out.pooler_output if self.model_type.startswith("siglip") else None
            return out.last_hidden_state, pooled
        # DINOv2 (interpolates its positions itself), DINOv3 (RoPE: any size).
        return self.net(pixel_values=x).last_hidden_state, None


def load_pretrained(pretrained: str, name: str) -> torch.nn.Module:
    """The frozen transformers vision model at `pretrained`, with a clear error offline."""
    from transformers import AutoConfig, AutoModel

    if not pretrained:
        raise ValueError(f"encoder {name} has no default weights: set encoder.pretrained=DIR")
    path = os.path.expanduser(pretrained)
    if pretrained.startswith((".", "/", "~")) and not os.path.isdir(path):
        raise FileNotFoundError(
            f"encoder folder {pretrained!r} does not exist (encoder.pretrained=)"
        )
    try:
        config = AutoConfig.from_pretrained(path)
        if config.model_type == "vit_mae":
            config.mask_ratio = 0.0  # every patch (MAE's training masks 75%)
        # A plain ViT's pooler is a classification head nobody trained here: leave it out.
        extra = {"add_pooling_layer": False} if config.model_type == "vit" else {}
        net = AutoModel.from_pretrained(path, config=config, **extra)
    except (OSError, ValueError) as err:
        raise OSError(
            f"Could not load the vision encoder {name} from {pretrained!r} ({err}). Offline, "
            "download it where there is network (huggingface-cli download ID, or transformers "
            "save_pretrained) and pass the folder: encoder.pretrained=DIR"
        ) from err
    net = getattr(net, "vision_model", net)  # SiglipModel: the image tower only
    net.requires_grad_(False)
    return net.eval()


def check_grids(encoder: FrozenEncoder, backbone_grid: int, where: str) -> None:
    """The encoder's token grid must equal the backbone's or be an integer multiple / divisor of it
    (then `match_grid` pools or repeats); otherwise a clear error naming both grids."""
    g = encoder.grid
    if g == backbone_grid or g % backbone_grid == 0 or backbone_grid % g == 0:
        return
    raise ValueError(
        f"{where}: the encoder {encoder.name} gives a {g}x{g} token grid (encoder.resolution="
        f"{encoder.resolution} / patch {encoder.patch_size}), the backbone a "
        f"{backbone_grid}x{backbone_grid} grid; they must be equal or integer multiples. Set "
        f"encoder.resolution={backbone_grid * encoder.patch_size}, or change model.patch_size"
    )


def match_grid(tokens: torch.Tensor, grid: int) -> torch.Tensor:
    """(N, g*g, D) raster-order tokens -> (N, grid*grid, D): average-pooled when g is a multiple of
    grid, repeated (nearest) when grid is a multiple of g."""
    n, t, d = tokens.shape
    g = math.isqrt(t)
    if g == grid:
        return tokens
    x = tokens.transpose(1, 2).reshape(n, d, g, g)
    x = F.avg_pool2d(x, g // grid) if g > grid else F.interpolate(x, scale_factor=grid // g)
    return x.flatten(2).transpose(1, 2)
