"""Multimodal Diffusion Transformer (MMDiT) of Stable Diffusion 3 (Esser et al., "Scaling Rectified
Flow Transformers for High-Resolution Image Synthesis", 2024, Fig. 2).

Image tokens and text tokens keep separate weights (two "streams": adaLN modulation, QKV, output
projection, MLP) but meet in ONE attention over the joined sequence. The conditioning vector
c = timestep embedding + projection of the pooled text embedding modulates both streams. The last
block updates only the image stream (its text stream just lends keys and values). Sized SD3's way
by depth d: d heads of 64 channels, so width 64 d. The model knows nothing of diffusion.

Caption dropout (for classifier-free guidance): in training each sample's text condition is
replaced with probability `caption_dropout_prob` by the null condition, which is ZERO context and
ZERO pooled embeddings (as SD3 drops its text encoders to zero). `null_condition(context, pooled)`
builds it for the sampler.
"""

import torch
from torch import nn

from .attention import Attention, attention, make_mlp, make_norm
from .dit import FinalLayer, modulate
from .embeddings import PatchEmbed, TimestepEmbedder, sincos_2d


def joint_attention(
    image_qkv: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    text_qkv: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """One softmax over the concatenated sequence [image; text] (SD3 Fig. 2b).

    image_qkv: q, k, v each (N, heads, T, hd); text_qkv: each (N, heads, L, hd).
    Returns the attention outputs of the image tokens (N, T, heads*hd) and the text tokens (N, L,
    heads*hd).
    """
    t = image_qkv[0].shape[2]
    q, k, v = (torch.cat([a, b], dim=2) for a, b in zip(image_qkv, text_qkv))
    out = attention(q, k, v)  # (N, heads, T + L, hd)
    out = out.transpose(1, 2).flatten(2)  # (N, T + L, D)
    return out[:, :t], out[:, t:]


class Stream(nn.Module):
    """One modality's half of a joint block: adaLN-Zero modulation from c, QKV, output projection,
    MLP. A `pre_only` stream (the text stream of the last block) has only the modulated QKV: 2
    modulation vectors (shift, scale) instead of 6, no projection, no MLP. A `dual` stream (the
    image stream of SD3.5-medium's MMDiT-X blocks) adds a second self-attention over its own
    tokens after the joint one, from the same norm with its own shift, scale and gate: 9 vectors."""

    def __init__(
        self,
        hidden: int,
        heads: int,
        mlp_ratio: float,
        qk_norm: bool,
        pre_only: bool = False,
        dual: bool = False,
    ):
        super().__init__()
        self.pre_only, self.dual = pre_only, dual
        self.norm1 = make_norm("layernorm", hidden)
        self.attn = Attention(hidden, heads, qk_norm, out_proj=not pre_only)
        if dual:
            self.attn2 = Attention(hidden, heads, qk_norm)
        if not pre_only:
            self.norm2 = make_norm("layernorm", hidden)
            self.mlp = make_mlp("gelu", hidden, int(hidden * mlp_ratio))
        self.num_mods = 2 if pre_only else 9 if dual else 6
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, self.num_mods * hidden))

    def pre_attention(
        self, x: torch.Tensor, c: torch.Tensor
    ) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        """x: (N, T, D), c: (N, D) -> (q, k, v) each (N, heads, T, hd), and the modulation vectors
        still needed (for a dual stream also the second attention's modulated input (N, T, D))."""
        mods = self.adaLN_modulation(c).chunk(self.num_mods, dim=1)
        normed = self.norm1(x)
        qkv = self.attn.heads_qkv(modulate(normed, mods[0], mods[1]))
        if self.dual:  # shift_msa2, scale_msa2, gate_msa2 come last (SD3.5's AdaLayerNormZeroX)
            return qkv, (*mods[2:6], modulate(normed, mods[6], mods[7]), mods[8])
        return qkv, mods[2:]

    def post_attention(
        self, x: torch.Tensor, attn_out: torch.Tensor, mods: tuple[torch.Tensor, ...]
    ) -> torch.Tensor:
        """x, attn_out: (N, T, D) -> (N, T, D): gated residual attention, then the gated modulated
        MLP."""
        gate_msa, shift_mlp, scale_mlp, gate_mlp = mods[:4]
        x = x + gate_msa.unsqueeze(1) * self.attn.proj(attn_out)
        if self.dual:
            x2, gate_msa2 = mods[4:]
            x = x + gate_msa2.unsqueeze(1) * self.attn2(x2)
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class JointBlock(nn.Module):
    """An MMDiT block: image and text streams with their own weights, one joint attention."""

    def __init__(
        self,
        hidden: int,
        heads: int,
        mlp_ratio: float,
        qk_norm: bool,
        last: bool = False,
        dual: bool = False,
    ):
        super().__init__()
        self.image = Stream(hidden, heads, mlp_ratio, qk_norm, dual=dual)
        self.text = Stream(hidden, heads, mlp_ratio, qk_norm, pre_only=last)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor, c: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x: (N, T, D) image tokens, context: (N, L, D) text tokens, c: (N, D).
        Returns the updated (x, context); context is None after the last block."""
        x_qkv, x_mods = self.image.pre_attention(x, c)
        c_qkv, c_mods = self.text.pre_attention(context, c)
        x_attn, c_attn = joint_attention(x_qkv, c_qkv)
        x = self.image.post_attention(x, x_attn, x_mods)
        if self.text.pre_only:
            return x, None
        return x, self.text.post_attention(context, c_attn, c_mods)


class MMDiT(nn.Module):
    """Text-conditional MMDiT (a `Backbone`). forward(x: (N, C, H, W), t: (N,),
    context: (N, L, context_dim), pooled: (N, pooled_dim)) -> (N, C_out, H, W),
    C_out = 2C if learn_sigma else C.

    Width = num_heads * head_dim; num_heads defaults to depth (SD3: d heads of 64, width 64 d).
    The fixed 2-D sin-cos table covers a pos_embed_max_size^2 grid (default: the input_size grid)
    and is centre-cropped to each input's grid (SD3), so one model takes several resolutions up to
    that size. dual_attention_layers: the blocks whose image stream has a second self-attention
    (SD3.5-medium's MMDiT-X: blocks 0..12). pos_embed_base_size: the table's positions are
    arange(max) * base / max (diffusers' SD3 formula, base = sample_size / patch_size); None:
    integer positions.
    """

    condition_keys = ("context", "pooled")

    def __init__(
        self,
        input_size: int = 128,
        patch_size: int = 2,
        in_channels: int = 16,
        depth: int = 24,
        num_heads: int | None = None,
        head_dim: int = 64,
        mlp_ratio: float = 4.0,
        context_dim: int | None = 4096,
        pooled_dim: int | None = 2048,
        context_len: int | None = 154,
        pos_embed_max_size: int | None = None,
        pos_embed_base_size: int | None = None,
        qk_norm: bool = False,
        learn_sigma: bool = False,
        caption_dropout_prob: float = 0.1,
        dual_attention_layers: tuple[int, ...] | list[int] = (),
    ):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(
                f"patch_size {patch_size} does not divide the latent size {input_size}; "
                f"choose model.patch_size from {[p for p in (1, 2, 4, 8) if input_size % p == 0]}"
            )
        if depth < 1:
            raise ValueError(f"model.depth must be >= 1, got {depth}")
        if context_dim is None or pooled_dim is None or context_len is None:
            raise ValueError(
                "MMDiT needs the text embeddings' shape (context_len, context_dim, pooled_dim) and "
                "the data gives none: "
                "train it on captioned shards (data=digits_t2i, or "
                "data.context_len/context_dim/pooled_dim as printed "
                "by python -m data_pipelines.extract_text_embeddings)"
            )
        if not 0.0 <= caption_dropout_prob < 1.0:
            raise ValueError(f"caption_dropout_prob must lie in [0, 1), got {caption_dropout_prob}")
        dual_attention_layers = tuple(dual_attention_layers)
        if any(not 0 <= i < depth for i in dual_attention_layers):
            raise ValueError(
                f"model.dual_attention_layers {list(dual_attention_layers)} must be block indices "
                f"0..{depth - 1}"
            )
        num_heads = depth if num_heads is None else num_heads
        grid = input_size // patch_size
        pos_embed_max_size = grid if pos_embed_max_size is None else pos_embed_max_size
        if pos_embed_max_size < grid:
            raise ValueError(
                f"pos_embed_max_size {pos_embed_max_size} is smaller than the latent grid {grid} "
                f"(input_size {input_size} / patch_size {patch_size}); set model.pos_embed_max_size >= {grid}"
            )
        self.input_size, self.patch_size, self.in_channels = input_size, patch_size, in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.learn_sigma = learn_sigma
        self.depth, self.num_heads, self.mlp_ratio = depth, num_heads, mlp_ratio
        self.hidden_size = hidden = num_heads * head_dim
        self.context_dim, self.pooled_dim, self.context_len = context_dim, pooled_dim, context_len
        self.pos_embed_max_size = pos_embed_max_size
        self.pos_embed_base_size = pos_embed_base_size
        self.qk_norm = qk_norm
        self.dual_attention_layers = dual_attention_layers
        self.caption_dropout_prob = caption_dropout_prob

        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden)
        self.t_embedder = TimestepEmbedder(hidden)
        self.context_embedder = nn.Linear(context_dim, hidden)
        # SD3 projects the pooled text with a 2-layer MLP and adds it to the timestep embedding.
        self.pooled_embedder = nn.Sequential(
            nn.Linear(pooled_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden)
        )
        table = sincos_2d(hidden, pos_embed_max_size, pos_embed_base_size).view(
            pos_embed_max_size, pos_embed_max_size, hidden
        )
        self.register_buffer("pos_embed", table, persistent=False)  # fixed: rebuilt from the config
        self.blocks = nn.ModuleList(
            JointBlock(
                hidden,
                num_heads,
                mlp_ratio,
                qk_norm,
                last=i == depth - 1,
                dual=i in dual_attention_layers,
            )
            for i in range(depth)
        )
        self.final_layer = FinalLayer(hidden, patch_size, self.out_channels, "layernorm")
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT's initialisation: Xavier linears, N(0, 0.02) timestep MLP, zero adaLN gates and
        output, so every block starts as the identity on both streams (adaLN-Zero)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for blk in self.blocks:
            for stream in (blk.image, blk.text):
                nn.init.zeros_(stream.adaLN_modulation[-1].weight)
                nn.init.zeros_(stream.adaLN_modulation[-1].bias)
        for layer in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def cropped_pos_embed(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """(grid_h * grid_w, D): the centre crop of the max-size table, row-major like the
        tokens."""
        m = self.pos_embed_max_size
        if grid_h > m or grid_w > m:
            raise ValueError(
                f"input grid {grid_h}x{grid_w} exceeds pos_embed_max_size {m}; "
                f"build the model with model.pos_embed_max_size >= {max(grid_h, grid_w)}"
            )
        top, left = (m - grid_h) // 2, (m - grid_w) // 2
        return self.pos_embed[top : top + grid_h, left : left + grid_w].reshape(grid_h * grid_w, -1)

    def null_condition(
        self, context: torch.Tensor, pooled: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """The unconditional input for classifier-free guidance: zeros shaped like the condition
        (the value caption dropout substitutes in training)."""
        return {"context": torch.zeros_like(context), "pooled": torch.zeros_like(pooled)}

    def drop_captions(
        self, context: torch.Tensor, pooled: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Training-time caption dropout (global torch RNG, one draw per sample, as DiT's label
        dropout)."""
        keep = (
            torch.rand(context.shape[0], device=context.device) >= self.caption_dropout_prob
        ).to(context.dtype)
        return context * keep[:, None, None], pooled * keep[:, None].to(pooled.dtype)

    def unpatchify(self, x: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
        """(N, T, p*p*C) -> (N, C, H, W), tokens in row-major order."""
        p, c = self.patch_size, self.out_channels
        x = x.reshape(x.shape[0], grid_h, grid_w, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, grid_h * p, grid_w * p)

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, pooled: torch.Tensor
    ) -> torch.Tensor:
        """x: (N, C, H, W) latents, t: (N,) timesteps, context: (N, L, context_dim), pooled: (N,
        pooled_dim)."""
        h, w = x.shape[-2:]
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"input {h}x{w} is not divisible by patch_size {self.patch_size}")
        if context.shape[-1] != self.context_dim or pooled.shape[-1] != self.pooled_dim:
            raise ValueError(
                f"text embeddings of widths context {context.shape[-1]} / pooled {pooled.shape[-1]} "
                "do not match the "
                f"model's context_dim {self.context_dim} / pooled_dim {self.pooled_dim}; set them "
                "from the data's text encoders"
            )
        if self.training and self.caption_dropout_prob > 0:
            context, pooled = self.drop_captions(context, pooled)
        gh, gw = h // self.patch_size, w // self.patch_size
        tokens = self.x_embedder(x) + self.cropped_pos_embed(gh, gw).to(x.dtype)  # (N, T, D)
        dtype = self.context_embedder.weight.dtype
        c = self.t_embedder(t) + self.pooled_embedder(pooled.to(dtype))  # (N, D)
        text = self.context_embedder(context.to(dtype))  # (N, L, D)
        for blk in self.blocks:
            tokens, text = blk(tokens, text, c)
        return self.unpatchify(self.final_layer(tokens, c), gh, gw)

    def forward_flops(self, batch_size: int = 1, context_len: int | None = None) -> int:
        """Analytic forward FLOPs (2 x multiply-adds) of the matmuls at input_size, attention
        included.
        context_len: text tokens per sample (default: the constructor's context_len)."""
        d, n_img = self.hidden_size, (self.input_size // self.patch_size) ** 2
        n_txt = self.context_len if context_len is None else context_len
        seq, hidden_mlp = n_img + n_txt, int(d * self.mlp_ratio)
        full_stream = 4 * d * d + 2 * d * hidden_mlp  # qkv + proj + MLP, per token
        macs_block = (
            (n_img + n_txt) * full_stream + 2 * seq * seq * d + 2 * 6 * d * d
        )  # + scores, weighted sum, adaLN
        macs_last = n_img * full_stream + n_txt * 3 * d * d + 2 * seq * seq * d + (6 + 2) * d * d
        macs = (self.depth - 1) * macs_block + macs_last
        # A dual block's image-only attention: qkv + proj, T x T scores and sum, 3 more adaLN rows.
        macs += len(self.dual_attention_layers) * (
            n_img * 4 * d * d + 2 * n_img * n_img * d + 3 * d * d
        )
        macs += n_img * self.in_channels * self.patch_size**2 * d  # patch embedding
        macs += self.t_embedder.frequency_embedding_size * d + d * d  # timestep MLP
        macs += (
            self.pooled_dim * d + d * d + n_txt * self.context_dim * d
        )  # pooled MLP, context embedder
        macs += 2 * d * d + n_img * d * self.final_layer.linear.out_features  # final layer
        return 2 * macs * batch_size
