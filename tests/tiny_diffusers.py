"""Tiny diffusers and ditkit configurations shared by the diffusers tests (interchange, export,
pretrained), and the random weights they are filled with. Nothing downloads: every model is built
from these configs.

The sizes fit each other: 8 x 8 latents with 4 channels, patch 2 (a 4 x 4 grid), width 32, 2
blocks; the SD3 / MMDiT pair has a 6 x 6 position table (cropped to the grid, as diffusers scales
it) and 5 context tokens of width 12.
"""

from __future__ import annotations

import torch

# diffusers' DiTTransformer2DModel: learned sigma (8 = 2 x 4 output channels), 1000 classes.
DIFFUSERS_DIT = dict(
    num_attention_heads=2,
    attention_head_dim=16,
    in_channels=4,
    out_channels=8,
    num_layers=2,
    sample_size=8,
    patch_size=2,
    num_embeds_ada_norm=1000,
    norm_eps=1e-6,
)
# diffusers' SD3Transformer2DModel.
DIFFUSERS_SD3 = dict(
    sample_size=8,
    patch_size=2,
    in_channels=4,
    num_layers=2,
    attention_head_dim=8,
    num_attention_heads=2,
    joint_attention_dim=12,
    caption_projection_dim=16,
    pooled_projection_dim=6,
    out_channels=4,
    pos_embed_max_size=6,
    qk_norm=None,
)
# ditkit's MMDiT of the same sizes as DIFFUSERS_SD3 (keyword arguments of ditkit.models.MMDiT).
MMDIT = dict(
    input_size=8,
    patch_size=2,
    in_channels=4,
    depth=2,
    num_heads=2,
    head_dim=8,
    context_dim=12,
    pooled_dim=6,
    context_len=5,
    pos_embed_max_size=6,
)


def randomize(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter N(0, 0.1) from `seed`: diffusers' and ditkit's zero inits would hide mapping
    errors. Returns the module."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return module


def share_first_embedder(model) -> None:
    """ditkit's DiT has one timestep/class embedder: make every block's copy in a diffusers DiT
    block 0's (as DiT checkpoints are)."""
    first = model.transformer_blocks[0].norm1.emb.state_dict()
    for blk in model.transformer_blocks[1:]:
        blk.norm1.emb.load_state_dict(first)
