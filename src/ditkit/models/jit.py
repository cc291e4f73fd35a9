"""JiT, "Just image Transformer" (Li & He, "Back to Basics: Let Denoising Generative Models
Denoise", arXiv 2511.13720): a plain ViT on large pixel patches that predicts the clean image
(objective.prediction=x, loss_space=v).

Follows LTH14/JiT model_jit.py: a bottleneck patch embedding (a p x p conv to a narrow width, then
a 1 x 1 conv to the token width), fixed 2-D sin-cos positions, adaLN-Zero blocks with RMSNorm (with
weights), QK-norm, 2-D RoPE and SwiGLU, and `in_context_len` class tokens (the label embedding plus
a learned position) prepended at block `in_context_start`, dropped before the final layer. Built from
ditkit's parts (embeddings.py, attention.py, dit.py). Two notational differences, neither changing
what the network can compute: RoPE rotates channel pairs (i, i + hd/2) rather than (2i, 2i + 1) (a
fixed permutation of each head's channels), and the time input is whatever the objective passes
(ditkit's flow: t * 1000, t = 1 noise; the reference: t in [0, 1], t = 1 clean).
"""

import torch
from torch import nn

from .attention import Attention, SwiGLU, make_norm
from .dit import FinalLayer, modulate, unpatchify
from .embeddings import (
    LabelEmbedder,
    TimestepEmbedder,
    add_extra_times,
    extra_time_embedders,
    null_labels,
    rope_2d,
    sincos_2d,
)


class BottleneckPatchEmbed(nn.Module):
    """p x p patches -> `bottleneck` channels (no bias) -> tokens of width D (1 x 1 conv).
    x: (N, C, H, W) -> (N, T, D). JiT sec. 4: a low-rank linear patch embedding (128 for B and L,
    256 for H) helps at patch 16-32, where a patch has 768-3072 values."""

    def __init__(self, patch_size: int, in_channels: int, bottleneck: int, hidden_size: int):
        super().__init__()
        self.proj1 = nn.Conv2d(in_channels, bottleneck, patch_size, stride=patch_size, bias=False)
        self.proj2 = nn.Conv2d(bottleneck, hidden_size, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj2(self.proj1(x)).flatten(2).transpose(1, 2)


class JiTBlock(nn.Module):
    """adaLN-Zero block (DiT) with RMSNorm carrying weights, QK-norm and SwiGLU (LTH14/JiT's
    JiTBlock). dropout: JiT's proj_dropout, on the attention output and the SwiGLU hidden units."""

    def __init__(self, hidden: int, heads: int, mlp_ratio: float, dropout: float = 0.0):
        super().__init__()
        self.norm1 = make_norm("rmsnorm", hidden, affine=True)
        self.attn = Attention(hidden, heads, qk_norm=True)
        self.attn_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.norm2 = make_norm("rmsnorm", hidden, affine=True)
        self.mlp = SwiGLU(hidden, int(hidden * mlp_ratio), multiple_of=1, dropout=dropout)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))

    def forward(self, x: torch.Tensor, c: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        """x: (N, T, D), c: (N, D), rope: (2, T, hd)."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(
            c
        ).chunk(6, dim=1)
        attn = self.attn(modulate(self.norm1(x), shift_msa, scale_msa), rope)
        x = x + gate_msa.unsqueeze(1) * self.attn_dropout(attn)
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class JiT(nn.Module):
    """Class-conditional JiT (a `Backbone`): forward(x: (N, C, H, W), t: (N,), y: (N,)) -> (N, C,
    H, W), the clean-image prediction when trained with objective.prediction=x.

    bottleneck_dim: width of the patch embedding's bottleneck. in_context_len class tokens join
    the sequence before block in_context_start (0 tokens: none). proj_dropout: dropout in the
    middle half of the blocks (depth/4 <= i < 3 depth/4, as the reference; JiT-H: 0.2).
    second_time / guidance_input: a second time `t2` (MeanFlow's r or t - r) and a guidance scale
    `w` (improved MeanFlow) as inputs, each through its own timestep embedder added to t's, as
    DiT's (Gsunshine/meanflow models_dit.py sums them); off, the state_dict is the reference's.
    """

    condition_keys = ("y",)
    learn_sigma = False

    def __init__(
        self,
        input_size: int = 256,
        patch_size: int = 16,
        in_channels: int = 3,
        hidden_size: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        bottleneck_dim: int = 128,
        in_context_len: int = 32,
        in_context_start: int = 4,
        num_classes: int = 1000,
        class_dropout_prob: float = 0.1,
        proj_dropout: float = 0.0,
        second_time: bool = False,
        guidance_input: bool = False,
    ):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(
                f"patch_size {patch_size} does not divide the image size {input_size}; JiT uses "
                "16 at 256 px and 32 at 512 px (model=jit_b16 ... jit_h32)"
            )
        if in_context_len and not 0 <= in_context_start < depth:
            raise ValueError(
                f"in_context_start must lie in [0, depth={depth}), got {in_context_start}"
            )
        self.input_size, self.patch_size, self.in_channels = input_size, patch_size, in_channels
        self.out_channels = in_channels
        self.hidden_size, self.depth, self.num_heads = hidden_size, depth, num_heads
        self.num_classes = num_classes
        self.in_context_len, self.in_context_start = in_context_len, in_context_start
        grid = input_size // patch_size

        self.x_embedder = BottleneckPatchEmbed(patch_size, in_channels, bottleneck_dim, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.second_time = second_time
        self.guidance_input = guidance_input
        if second_time:
            self.t2_embedder = TimestepEmbedder(hidden_size)
        if guidance_input:
            self.w_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        self.register_buffer("pos_embed", sincos_2d(hidden_size, grid).unsqueeze(0))  # (1, T, D)
        if in_context_len:
            self.in_context_posemb = nn.Parameter(torch.zeros(1, in_context_len, hidden_size))
        head_dim = hidden_size // num_heads
        # Image tokens rotate with their row and column; the class tokens are not rotated.
        self.register_buffer("rope", rope_2d(head_dim, grid), persistent=False)
        self.register_buffer(
            "rope_in_context", rope_2d(head_dim, grid, in_context_len), persistent=False
        )
        lo, hi = depth // 4, depth // 4 * 3
        self.blocks = nn.ModuleList(
            JiTBlock(hidden_size, num_heads, mlp_ratio, proj_dropout if lo <= i < hi else 0.0)
            for i in range(depth)
        )
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels, "rmsnorm")
        self.final_layer.norm_final = make_norm("rmsnorm", hidden_size, affine=True)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """The reference's initialisation: Xavier linears and patch convs (as linear maps), N(0,
        0.02) embeddings and class-token positions, zero adaLN and output."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        for conv in (self.x_embedder.proj1, self.x_embedder.proj2):
            nn.init.xavier_uniform_(conv.weight.view(conv.weight.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj2.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        for embedder in (self.t_embedder, *extra_time_embedders(self).values()):
            nn.init.normal_(embedder.mlp[0].weight, std=0.02)
            nn.init.normal_(embedder.mlp[2].weight, std=0.02)
        if self.in_context_len:
            nn.init.normal_(self.in_context_posemb, std=0.02)
        for blk in self.blocks:
            nn.init.zeros_(blk.adaLN_modulation[-1].weight)
            nn.init.zeros_(blk.adaLN_modulation[-1].bias)
        for layer in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def embed_condition(
        self,
        t: torch.Tensor,
        y: torch.Tensor,
        t2: torch.Tensor | None = None,
        w: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, ...]:
        """(c, y_emb), each (N, D): c = t_emb (+ t2's and w's embeddings) + y_emb modulates every
        block; y_emb also makes the class tokens."""
        t_emb = add_extra_times(self, self.t_embedder(t), t2=t2, w=w)
        y_emb = self.y_embedder(y, self.training)
        return t_emb + y_emb, y_emb

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
    ) -> torch.Tensor:
        """x: (N, C, H, W) pixels in [-1, 1] (noised), t: (N,), y: (N,) labels (num_classes =
        null); t2, w: (N,) with second_time / guidance_input (required then, refused otherwise)."""
        c, y_emb = self.embed_condition(t, y, t2, w)
        tokens = self.x_embedder(x) + self.pos_embed  # (N, T, D)
        n_ctx = self.in_context_len
        for i, blk in enumerate(self.blocks):
            if n_ctx and i == self.in_context_start:
                ctx = y_emb.unsqueeze(1) + self.in_context_posemb  # (N, L, D)
                tokens = torch.cat([ctx.to(tokens.dtype), tokens], dim=1)  # (N, L + T, D)
            in_context = n_ctx and i >= self.in_context_start
            tokens = blk(tokens, c, self.rope_in_context if in_context else self.rope)
        return self.unpatchify(self.final_layer(tokens[:, n_ctx:], c))

    def null_condition(self, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """Classifier-free guidance's unconditional half: the null class (index num_classes)."""
        return {"y": null_labels(y, self.y_embedder)}

    def forward_flops(self, batch_size: int = 1) -> int:
        """Analytic forward FLOPs (2 x multiply-adds) of the matmuls, attention included."""
        d, tokens = self.hidden_size, (self.input_size // self.patch_size) ** 2
        mlp = self.blocks[0].mlp
        hidden = mlp.fc2.in_features
        macs = 0
        for i in range(self.depth):
            seq = tokens + (self.in_context_len if i >= self.in_context_start else 0)
            macs += seq * d * 4 * d + 2 * seq * seq * d  # qkv + proj, scores + weighted sum
            macs += seq * (d * 2 * hidden + hidden * d)  # SwiGLU
            macs += d * 6 * d  # adaLN, once per sample
        bottleneck = self.x_embedder.proj1.out_channels
        macs += tokens * (self.in_channels * self.patch_size**2 * bottleneck + bottleneck * d)
        embedders = 1 + len(extra_time_embedders(self))
        macs += embedders * (self.t_embedder.frequency_embedding_size * d + d * d)  # timestep MLPs
        macs += d * 2 * d + tokens * d * self.final_layer.linear.out_features  # final layer
        return 2 * macs * batch_size


# LTH14/JiT model_jit.py (JiT_B_16 ... JiT_H_32): depth, width, heads, bottleneck, class-token
# start; 32 class tokens each. Parameters at 256 px / patch 16 (512 px / patch 32): B 131.1 M
# (133.2 M), L 458.9 M (461.5 M), H 952.5 M (956.1 M): the paper's 131 M, 459 M, 953 M.
JIT_VARIANTS = {
    "B": dict(depth=12, hidden_size=768, num_heads=12, bottleneck_dim=128, in_context_start=4),
    "L": dict(depth=24, hidden_size=1024, num_heads=16, bottleneck_dim=128, in_context_start=8),
    "H": dict(depth=32, hidden_size=1280, num_heads=16, bottleneck_dim=256, in_context_start=10),
}


def build_jit(variant: str = "B", patch_size: int = 16, **kwargs) -> JiT:
    """A named variant, e.g. build_jit("H", 16) is JiT-H/16; kwargs that are not None override
    the variant's sizes or set options."""
    if variant not in JIT_VARIANTS:
        raise ValueError(f"unknown JiT variant {variant!r}; valid: {', '.join(JIT_VARIANTS)}")
    overrides = {k: v for k, v in kwargs.items() if v is not None}
    return JiT(patch_size=patch_size, **{**JIT_VARIANTS[variant], **overrides})
