"""Diffusion Transformer (Peebles & Xie, "Scalable Diffusion Models with Transformers", 2023).

Reads like the paper's Fig. 3: embedders (embeddings.py), the four block designs, the final layer,
the DiT itself, and the table of named variants. With default options the state_dict has exactly
the keys and shapes of the official checkpoints. The model knows nothing of diffusion: it maps
(x_t, t, y) to an output with the latent's layout (twice the channels when learn_sigma).
"""

import math

import torch
from torch import nn

from .attention import Attention, CrossAttention, make_mlp, make_norm
from .embeddings import (
    LabelEmbedder,
    PatchEmbed,
    TimestepEmbedder,
    add_extra_times,
    extra_time_embedders,
    null_labels,
    rope_2d,
    sincos_2d,
)


def unpatchify(x: torch.Tensor, patch_size: int, channels: int) -> torch.Tensor:
    """(N, T, p*p*C) -> (N, C, H, W) for a square grid of T tokens in row-major order."""
    p, c = patch_size, channels
    g = math.isqrt(x.shape[1])
    x = x.reshape(x.shape[0], g, g, p, p, c)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, g * p, g * p)


BLOCK_DESIGNS = ("adaln_zero", "adaln", "cross_attn", "in_context")


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Adaptive norm: x (N, T, D) scaled and shifted per sample by (N, D) vectors."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class AdaLNZeroBlock(nn.Module):
    """DiT block with adaLN-Zero: c regresses shift, scale and a residual gate for both sub-layers;
    the gates start at zero so every block starts as the identity (paper Sec. 3.2)."""

    def __init__(
        self, hidden: int, heads: int, mlp_ratio: float, norm: str, mlp: str, qk_norm: bool
    ):
        super().__init__()
        self.norm1 = make_norm(norm, hidden)
        self.attn = Attention(hidden, heads, qk_norm)
        self.norm2 = make_norm(norm, hidden)
        self.mlp = make_mlp(mlp, hidden, int(hidden * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))

    def forward(
        self, x: torch.Tensor, c: torch.Tensor, rope: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x: (N, T, D), c: (N, D)."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(
            c
        ).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(
            modulate(self.norm1(x), shift_msa, scale_msa), rope
        )
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class AdaLNBlock(nn.Module):
    """adaLN block (paper Sec. 3.2): c regresses only shift and scale; no residual gates."""

    def __init__(
        self, hidden: int, heads: int, mlp_ratio: float, norm: str, mlp: str, qk_norm: bool
    ):
        super().__init__()
        self.norm1 = make_norm(norm, hidden)
        self.attn = Attention(hidden, heads, qk_norm)
        self.norm2 = make_norm(norm, hidden)
        self.mlp = make_mlp(mlp, hidden, int(hidden * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 4 * hidden))

    def forward(
        self, x: torch.Tensor, c: torch.Tensor, rope: torch.Tensor | None = None
    ) -> torch.Tensor:
        shift_msa, scale_msa, shift_mlp, scale_mlp = self.adaLN_modulation(c).chunk(4, dim=1)
        x = x + self.attn(modulate(self.norm1(x), shift_msa, scale_msa), rope)
        return x + self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class CrossAttnBlock(nn.Module):
    """Cross-attention block (paper Sec. 3.2): a multi-head cross-attention to the two conditioning
    tokens [t, y] follows self-attention. c: (N, 2, D)."""

    def __init__(
        self, hidden: int, heads: int, mlp_ratio: float, norm: str, mlp: str, qk_norm: bool
    ):
        super().__init__()
        self.norm1 = make_norm(norm, hidden, affine=True)
        self.attn = Attention(hidden, heads, qk_norm)
        self.norm_cross = make_norm(norm, hidden, affine=True)
        self.cross_attn = CrossAttention(hidden, heads, qk_norm)
        self.norm2 = make_norm(norm, hidden, affine=True)
        self.mlp = make_mlp(mlp, hidden, int(hidden * mlp_ratio))

    def forward(
        self, x: torch.Tensor, c: torch.Tensor, rope: torch.Tensor | None = None
    ) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), rope)
        x = x + self.cross_attn(self.norm_cross(x), c)
        return x + self.mlp(self.norm2(x))


class InContextBlock(nn.Module):
    """In-context conditioning (paper Sec. 3.2): t and y are two extra tokens of the sequence, so
    the block is a plain pre-norm ViT block. x: (N, 2 + T, D)."""

    def __init__(
        self, hidden: int, heads: int, mlp_ratio: float, norm: str, mlp: str, qk_norm: bool
    ):
        super().__init__()
        self.norm1 = make_norm(norm, hidden, affine=True)
        self.attn = Attention(hidden, heads, qk_norm)
        self.norm2 = make_norm(norm, hidden, affine=True)
        self.mlp = make_mlp(mlp, hidden, int(hidden * mlp_ratio))

    def forward(
        self, x: torch.Tensor, c: torch.Tensor, rope: torch.Tensor | None = None
    ) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), rope)
        return x + self.mlp(self.norm2(x))


BLOCKS = {
    "adaln_zero": AdaLNZeroBlock,
    "adaln": AdaLNBlock,
    "cross_attn": CrossAttnBlock,
    "in_context": InContextBlock,
}


class FinalLayer(nn.Module):
    """adaLN (shift, scale from c) then a linear map of each token to a p x p x C_out patch."""

    def __init__(self, hidden: int, patch_size: int, out_channels: int, norm: str):
        super().__init__()
        self.norm_final = make_norm(norm, hidden)
        self.linear = nn.Linear(hidden, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """x: (N, T, D), c: (N, D) -> (N, T, p*p*C_out)."""
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    """Class-conditional Diffusion Transformer (a `Backbone`).
    forward(x: (N, C, H, W), t: (N,), y: (N,)) -> (N, C_out, H, W).

    Beyond the reference (each off by default): `block` design, `qk_norm`, `norm="rmsnorm"`,
    `mlp="swiglu"`, `rope` (2-D RoPE on top of the fixed sin-cos table), `timestep_freq_shift=1`
    (the timestep frequencies of diffusers' DiTTransformer2DModel, which exports exactly; 0 is the
    reference DiT's), `mlp_norm_eps` (eps of each block's pre-MLP norm: diffusers' `norm_eps`).
    Activation checkpointing,
    compile and FSDP2 are applied to `blocks` from outside (ditkit.training.parallel).

    `second_time`: a second timestep embedder (`t2_embedder`, the official MeanFlow DiT's
    `h_embedder`, Gsunshine/meanflow models/models_dit.py) for a second scalar time `t2` (MeanFlow:
    r or t - r), added to t's embedding. `guidance_input`: one more (`w_embedder`) for a guidance
    scale `w` given as an input (improved MeanFlow, arXiv 2512.02012). Without them the state_dict
    is exactly the reference's.
    """

    condition_keys = ("y",)
    # forward takes `prefix` tokens (the Backbone contract's optional capability, protocol.py).
    accepts_prefix = True

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        learn_sigma: bool = True,
        block: str = "adaln_zero",
        qk_norm: bool = False,
        norm: str = "layernorm",
        mlp: str = "gelu",
        rope: bool = False,
        timestep_freq_shift: int = 0,
        mlp_norm_eps: float = 1e-6,
        second_time: bool = False,
        guidance_input: bool = False,
    ):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(
                f"patch_size {patch_size} does not divide the latent size {input_size}; "
                f"choose model.patch_size from {[p for p in (1, 2, 4, 8) if input_size % p == 0]}"
            )
        if block not in BLOCKS:
            raise ValueError(f"unknown block design {block!r}; valid: {', '.join(BLOCKS)}")
        self.input_size = input_size
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.hidden_size = hidden_size
        self.depth = depth
        self.num_heads = num_heads
        self.mlp_ratio = mlp_ratio
        self.num_classes = num_classes
        self.learn_sigma = learn_sigma
        self.block = block
        grid = input_size // patch_size

        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size, freq_shift=timestep_freq_shift)
        self.second_time = second_time
        self.guidance_input = guidance_input
        if second_time:
            self.t2_embedder = TimestepEmbedder(hidden_size)
        if guidance_input:
            self.w_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        self.register_buffer(
            "pos_embed", sincos_2d(hidden_size, grid).unsqueeze(0)
        )  # (1, T, D), fixed
        prefix = 2 if block == "in_context" else 0
        rope_table = rope_2d(hidden_size // num_heads, grid, prefix) if rope else None
        self.register_buffer("rope", rope_table, persistent=False)
        self.blocks = nn.ModuleList(
            BLOCKS[block](hidden_size, num_heads, mlp_ratio, norm, mlp, qk_norm)
            for _ in range(depth)
        )
        for (
            blk
        ) in self.blocks:  # diffusers' DiT sets this one norm's eps (`norm_eps`, default 1e-5)
            blk.norm2.eps = mlp_norm_eps
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels, norm)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """The paper's initialisation: Xavier linears, N(0, 0.02) embeddings, zero adaLN and
        output."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # as a linear map of flattened patches
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        for embedder in (self.t_embedder, *extra_time_embedders(self).values()):
            nn.init.normal_(embedder.mlp[0].weight, std=0.02)
            nn.init.normal_(embedder.mlp[2].weight, std=0.02)
        if self.block == "adaln_zero":
            for blk in self.blocks:
                nn.init.zeros_(blk.adaLN_modulation[-1].weight)
                nn.init.zeros_(blk.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(N, T, p*p*C) -> (N, C, H, W), tokens in row-major order."""
        return unpatchify(x, self.patch_size, self.out_channels)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        t2: torch.Tensor | None = None,
        w: torch.Tensor | None = None,
        prefix: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x: (N, C, H, W) latents, t: (N,) timesteps, y: (N,) labels (num_classes = null);
        t2: (N,) the second time and w: (N,) the guidance scale, with second_time / guidance_input
        (required then, refused otherwise). prefix: (N, K, D) extra tokens in the hidden width
        (REG's noisy class token, embedded by its objective term), put before the image tokens
        after the position embedding (no position of their own: the reference's zero row, REG
        models/sit.py), seen by every block and dropped before the final layer; block outputs
        are then (N, K + T, D) (in-context: (N, K + 2 + T, D)), the prefix first."""
        tokens = self.x_embedder(x) + self.pos_embed  # (N, T, D)
        k = 0 if prefix is None else self._check_prefix(prefix, tokens)
        t_emb = add_extra_times(self, self.t_embedder(t), t2=t2, w=w)  # (N, D)
        y_emb = self.y_embedder(y, self.training)  # (N, D)
        c = t_emb + y_emb
        if self.block == "cross_attn":
            block_cond = torch.stack([t_emb, y_emb], dim=1)  # (N, 2, D)
        else:
            block_cond = c
        if self.block == "in_context":
            tokens = torch.cat(
                [t_emb.unsqueeze(1), y_emb.unsqueeze(1), tokens], dim=1
            )  # (N, 2 + T, D)
        rope = self.rope
        if k:
            tokens = torch.cat([prefix.to(tokens.dtype), tokens], dim=1)  # (N, K + ..., D)
            if rope is not None:  # the prefix gets the identity rotation, as t, y do
                identity = torch.stack(
                    [torch.ones_like(rope[0, :k]), torch.zeros_like(rope[1, :k])]
                )
                rope = torch.cat([identity, rope], dim=1)
        for blk in self.blocks:
            tokens = blk(tokens, block_cond, rope)
        skip = k + (2 if self.block == "in_context" else 0)
        if skip:
            tokens = tokens[:, skip:]
        return self.unpatchify(self.final_layer(tokens, c))

    def _check_prefix(self, prefix: torch.Tensor, tokens: torch.Tensor) -> int:
        """K, the prefix's length, after checking its shape against the image tokens (N, T, D)."""
        n, _, d = tokens.shape
        if prefix.ndim != 3 or prefix.shape[0] != n or prefix.shape[2] != d:
            raise ValueError(
                f"prefix tokens must be (N, K, hidden_size) = ({n}, K, {d}), got "
                f"{tuple(prefix.shape)}"
            )
        return prefix.shape[1]

    def null_condition(self, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """Classifier-free guidance's unconditional half: every label replaced by the null class
        (index num_classes, the row label dropout trains; Ho & Salimans 2022)."""
        return {"y": null_labels(y, self.y_embedder)}

    def forward_flops(self, batch_size: int = 1) -> int:
        """Analytic forward FLOPs (2 x multiply-adds) of the matmuls, attention included."""
        d, tokens = self.hidden_size, (self.input_size // self.patch_size) ** 2
        seq = tokens + (2 if self.block == "in_context" else 0)
        blk = self.blocks[0]
        macs_per_block = seq * d * 4 * d + 2 * seq * seq * d  # qkv + proj, scores + weighted sum
        macs_per_block += seq * sum(
            m.in_features * m.out_features for m in (blk.mlp.fc1, blk.mlp.fc2)
        )
        if hasattr(blk, "adaLN_modulation"):  # once per sample, not per token
            macs_per_block += d * blk.adaLN_modulation[-1].out_features
        if (
            self.block == "cross_attn"
        ):  # q and proj over T tokens, kv over the 2 condition tokens, T x 2 scores
            macs_per_block += 2 * tokens * d * d + 2 * 2 * d * d + 2 * tokens * 2 * d
        macs = self.depth * macs_per_block
        macs += tokens * self.in_channels * self.patch_size**2 * d  # patch embedding
        embedders = 1 + len(extra_time_embedders(self))
        macs += embedders * (self.t_embedder.frequency_embedding_size * d + d * d)  # timestep MLPs
        macs += d * 2 * d + tokens * d * self.final_layer.linear.out_features  # final layer
        return 2 * macs * batch_size


# The paper's Table 1 (depth, width, heads); each size comes with patch sizes 2, 4, 8.
DIT_VARIANTS = {
    "S": dict(depth=12, hidden_size=384, num_heads=6),
    "B": dict(depth=12, hidden_size=768, num_heads=12),
    "L": dict(depth=24, hidden_size=1024, num_heads=16),
    "XL": dict(depth=28, hidden_size=1152, num_heads=16),
}


def build_dit(variant: str = "XL", patch_size: int = 2, **kwargs) -> DiT:
    """A named variant, e.g. build_dit("XL", 2) is DiT-XL/2; kwargs that are not None override the
    variant's sizes or set options."""
    if variant not in DIT_VARIANTS:
        raise ValueError(f"unknown DiT variant {variant!r}; valid: {', '.join(DIT_VARIANTS)}")
    overrides = {k: v for k, v in kwargs.items() if v is not None}
    return DiT(patch_size=patch_size, **{**DIT_VARIANTS[variant], **overrides})
