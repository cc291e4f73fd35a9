"""The convolutional U-Net baseline that DiT replaced (ADM: Dhariwal & Nichol, "Diffusion Models
Beat GANs on Image Synthesis", 2021; LDM: Rombach et al., 2022), built from `diffusers.UNet2DModel`
and wrapped with the DiT interface so that it trains, samples and evaluates with every objective and
sampler.

The class condition is a learned embedding added to the timestep embedding (ADM's class-conditional
U-Net); row `num_classes` of it is the null class for classifier-free guidance. Residual blocks use
ADM's AdaGN (`scale_shift`): the embedding regresses a scale and a shift of each GroupNorm.
"""

import torch
from diffusers import UNet2DModel
from diffusers.models.attention_processor import Attention as DiffusersAttention
from diffusers.models.resnet import ResnetBlock2D
from torch import nn

from .embeddings import drop_labels, null_labels


def _conv_macs(conv: nn.Conv2d, out_size: int) -> int:
    """Multiply-adds of a dense conv whose output is out_size x out_size: one weight tensor per
    pixel."""
    return out_size * out_size * conv.weight.numel()


def _linear_macs(linear: nn.Linear, tokens: int = 1) -> int:
    return tokens * linear.in_features * linear.out_features


def _stage_macs(block: nn.Module, size: int) -> int:
    """Multiply-adds of the residual blocks and attentions of one U-Net stage at resolution size x
    size (per sample). Attention: q, k, v, out projections over size^2 tokens plus QK^T and AV, 2
    T^2 D."""
    macs = 0
    for res in block.resnets:
        macs += (
            _conv_macs(res.conv1, size)
            + _conv_macs(res.conv2, size)
            + _linear_macs(res.time_emb_proj)
        )
        if res.conv_shortcut is not None:
            macs += _conv_macs(res.conv_shortcut, size)
    for attn in getattr(block, "attentions", None) or []:
        if attn is not None:
            tokens = size * size
            macs += sum(
                _linear_macs(lin, tokens)
                for lin in (attn.to_q, attn.to_k, attn.to_v, attn.to_out[0])
            )
            macs += 2 * tokens * tokens * attn.inner_dim
    return macs


class UNet(nn.Module):
    """Class-conditional U-Net with DiT's interface (a `Backbone`).
    forward(x: (N, C, H, W), t: (N,), y: (N,)) -> (N, C_out, H, W).

    block_out_channels: channels of each resolution level (level i works at input_size / 2^i);
    layers_per_block: residual blocks per level on the way down (one more on the way up, as in ADM);
    attention_levels: the levels that get a self-attention after each residual block (the middle
    block always has one); attention_head_dim: channels per head (ADM uses 64).
    """

    condition_keys = ("y",)

    def __init__(
        self,
        input_size: int = 32,
        in_channels: int = 4,
        num_classes: int = 1000,
        learn_sigma: bool = True,
        class_dropout_prob: float = 0.1,
        block_out_channels: tuple[int, ...] | list[int] = (128, 256, 384, 512),
        layers_per_block: int = 2,
        attention_levels: tuple[int, ...] | list[int] = (1, 2, 3),
        attention_head_dim: int = 64,
        norm_num_groups: int = 32,
    ):
        super().__init__()
        block_out_channels, attention_levels = tuple(block_out_channels), tuple(attention_levels)
        self._check(
            input_size,
            num_classes,
            class_dropout_prob,
            block_out_channels,
            attention_levels,
            attention_head_dim,
            norm_num_groups,
        )
        self.input_size = input_size
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.learn_sigma = learn_sigma
        self.class_dropout_prob = class_dropout_prob
        levels = range(len(block_out_channels))
        self.unet = UNet2DModel(
            sample_size=input_size,
            in_channels=in_channels,
            out_channels=self.out_channels,
            down_block_types=tuple(
                "AttnDownBlock2D" if i in attention_levels else "DownBlock2D" for i in levels
            ),
            up_block_types=tuple(
                "AttnUpBlock2D" if i in attention_levels else "UpBlock2D" for i in reversed(levels)
            ),
            block_out_channels=block_out_channels,
            layers_per_block=layers_per_block,
            attention_head_dim=attention_head_dim,
            norm_num_groups=norm_num_groups,
            attn_norm_num_groups=norm_num_groups,  # diffusers drops the mid attention's norm with scale_shift
            resnet_time_scale_shift="scale_shift",
            num_class_embeds=num_classes + 1,  # + the null class, always (guidance needs it)
        )
        self.initialize_weights()

    @staticmethod
    def _check(
        input_size, num_classes, class_dropout_prob, channels, attention_levels, head_dim, groups
    ) -> None:
        """Raise early, naming the config key, on sizes the U-Net cannot be built with."""
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if not 0 <= class_dropout_prob < 1:
            raise ValueError(f"class_dropout_prob must be in [0, 1), got {class_dropout_prob}")
        factor = 2 ** (len(channels) - 1)
        if input_size % factor:
            raise ValueError(
                f"input_size {input_size} is not divisible by {factor} (the U-Net halves it "
                f"{len(channels) - 1} "
                "times); use fewer model.block_out_channels or another latent size"
            )
        if any(c % groups for c in channels):
            raise ValueError(
                f"model.block_out_channels {list(channels)} must be multiples of norm_num_groups={groups}"
            )
        bad = [i for i in attention_levels if not 0 <= i < len(channels)]
        if bad:
            raise ValueError(
                f"model.attention_levels {bad} out of range: levels are 0..{len(channels) - 1}"
            )
        widths = [
            c for i, c in enumerate(channels) if i in attention_levels or i == len(channels) - 1
        ]
        if any(c % head_dim for c in widths):
            raise ValueError(
                f"attention_head_dim {head_dim} must divide the channels of every attention level {widths}"
            )

    def initialize_weights(self) -> None:
        """ADM's zero initialisation: the last conv of every residual block, every attention's
        output projection and the output conv start at zero, so each block starts as the identity
        (the convolutional counterpart of DiT's adaLN-Zero)."""
        for module in self.unet.modules():
            if isinstance(module, ResnetBlock2D):
                zero = module.conv2
            elif isinstance(module, DiffusersAttention):
                zero = module.to_out[0]
            else:
                continue
            nn.init.zeros_(zero.weight)
            nn.init.zeros_(zero.bias)
        nn.init.zeros_(self.unet.conv_out.weight)
        nn.init.zeros_(self.unet.conv_out.bias)

    @property
    def blocks(self) -> list[nn.Module]:
        """The U-Net's stages (down, middle, up), the units to shard or checkpoint, like
        DiT.blocks."""
        return [*self.unet.down_blocks, self.unet.mid_block, *self.unet.up_blocks]

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x: (N, C, H, W) latents, t: (N,) timesteps in [0, 1000), y: (N,) labels (num_classes =
        null)."""
        if self.training:
            y = drop_labels(y, self.num_classes, self.class_dropout_prob)
        return self.unet(x, t, class_labels=y, return_dict=False)[0]

    def null_condition(self, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """Classifier-free guidance's unconditional half: the null class (index num_classes)."""
        return {"y": null_labels(y, self.unet.class_embedding)}

    def forward_flops(self, batch_size: int = 1) -> int:
        """Analytic forward FLOPs (2 x multiply-adds) at input_size: convolutions, linears and
        attention matmuls, stage by stage at the resolution each runs at (norms and activations are
        not counted)."""
        u, size = self.unet, self.input_size
        last = len(u.down_blocks) - 1
        macs = _conv_macs(u.conv_in, size) + _conv_macs(u.conv_out, size)
        macs += _linear_macs(u.time_embedding.linear_1) + _linear_macs(u.time_embedding.linear_2)
        for level, block in enumerate(u.down_blocks):
            macs += _stage_macs(block, size >> level)
            if block.downsamplers is not None:  # stride-2 conv: its output is half the size
                macs += _conv_macs(block.downsamplers[0].conv, size >> (level + 1))
        macs += _stage_macs(u.mid_block, size >> last)
        for i, block in enumerate(u.up_blocks):
            macs += _stage_macs(block, size >> (last - i))
            if block.upsamplers is not None:  # nearest upsampling, then a conv at twice the size
                macs += _conv_macs(block.upsamplers[0].conv, size >> (last - i - 1))
        return 2 * macs * batch_size
