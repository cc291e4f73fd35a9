"""ditkit DiT <-> diffusers `DiTTransformer2DModel` (diffusers/models/transformers/
dit_transformer_2d.py): the key mapping and the config translation, both directions, strict.

What differs between the two layouts:
  - diffusers keeps a timestep + class embedder in EVERY block (`transformer_blocks.i.norm1.emb`)
    and its final layer reads block 0's; ditkit has one (`t_embedder`, `y_embedder`). Export copies
    it into each block; import requires every copy to equal block 0's.
  - diffusers splits the fused QKV projection into to_q / to_k / to_v.
  - diffusers' pre-MLP LayerNorm eps is `norm_eps` (default 1e-5, and what the released
    facebook/DiT-XL-2 folders leave it at); DiT's is 1e-6 (every other norm is 1e-6 in both). The
    ditkit option `mlp_norm_eps` carries it both ways.
  - folders written before DiTTransformer2DModel existed name `Transformer2DModel` with
    norm_type=ada_norm_zero; diffusers loads those as a DiTTransformer2DModel, and so does ditkit.
  - diffusers' timestep frequencies are 10000^(-i/127) (Timesteps(downscale_freq_shift=1) in its
    CombinedTimestepLabelEmbeddings, not configurable); the reference DiT's are 10000^(-i/128).
    A ditkit DiT with `timestep_freq_shift=1` has diffusers' frequencies; import sets it.
  - the sin-cos position table is a persistent buffer in ditkit and a rebuilt one in diffusers.
"""

from __future__ import annotations

import torch
from torch import nn

from ditkit.models import DiT
from ditkit.models.attention import Mlp

CLASS_NAME = "DiTTransformer2DModel"
LEGACY_CLASS_NAME = "Transformer2DModel"
_EMB = "norm1.emb"


def _representable(model: DiT, approximate: bool) -> None:
    """Raise naming the ditkit option that DiTTransformer2DModel has no counterpart for."""
    blk = model.blocks[0]
    problems = []
    if model.t_embedder.freq_shift != 1 and not approximate:
        problems.append(
            f"model.timestep_freq_shift={model.t_embedder.freq_shift} (the reference DiT's timestep "
            "frequencies 10000^(-i/128); DiTTransformer2DModel hard-codes 10000^(-i/127), so its "
            "forward would differ): train with model.timestep_freq_shift=1 for an exact export, or "
            "pass approximate=True (`python -m ditkit.export ... approximate=true`) to write it "
            "anyway, as diffusers' own conversion of the official DiT weights does"
        )
    if model.block != "adaln_zero":
        problems.append(f"model.block={model.block} (diffusers' DiT has adaln_zero blocks only)")
    if not isinstance(blk.norm1, nn.LayerNorm):
        problems.append("model.norm=rmsnorm (diffusers' DiT uses LayerNorm)")
    if not isinstance(blk.mlp, Mlp):
        problems.append("model.mlp=swiglu (diffusers' DiT uses a GELU-tanh MLP)")
    if not isinstance(blk.attn.q_norm, nn.Identity):
        problems.append("model.qk_norm=true (diffusers' DiT has no QK-norm)")
    if model.rope is not None:
        problems.append("model.rope=true (diffusers' DiT has no RoPE)")
    if model.mlp_ratio != 4.0:
        problems.append(f"model.mlp_ratio={model.mlp_ratio} (diffusers' DiT MLP is 4x wide)")
    if model.y_embedder.dropout_prob <= 0:
        problems.append("model.class_dropout_prob=0 (diffusers' DiT always has the null-class row)")
    if problems:
        raise ValueError(
            "this DiT cannot be written as a DiTTransformer2DModel: " + "; ".join(problems)
        )


def dit_to_diffusers(model: DiT, approximate: bool = False) -> tuple[dict, dict[str, torch.Tensor]]:
    """A ditkit DiT -> (DiTTransformer2DModel config, its state_dict). Tensors are the model's own
    (no copy); the QKV split and the per-block embedder copies are views. approximate: accept a
    model with the reference timestep frequencies (timestep_freq_shift=0), whose diffusers forward
    then differs in the timestep embedding."""
    _representable(model, approximate)
    heads = model.num_heads
    config = dict(
        num_attention_heads=heads,
        attention_head_dim=model.hidden_size // heads,
        in_channels=model.in_channels,
        out_channels=model.out_channels,
        num_layers=model.depth,
        dropout=0.0,
        attention_bias=True,
        sample_size=model.input_size,
        patch_size=model.patch_size,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=model.num_classes,
        upcast_attention=False,
        norm_type="ada_norm_zero",
        norm_elementwise_affine=False,
        norm_eps=model.blocks[0].norm2.eps,
    )
    src = model.state_dict()
    out = {
        "pos_embed.proj.weight": src["x_embedder.proj.weight"],
        "pos_embed.proj.bias": src["x_embedder.proj.bias"],
    }
    embedder = {
        "timestep_embedder.linear_1": "t_embedder.mlp.0",
        "timestep_embedder.linear_2": "t_embedder.mlp.2",
    }
    for i in range(model.depth):
        d, s = f"transformer_blocks.{i}.", f"blocks.{i}."
        for theirs, ours in embedder.items():
            for p in ("weight", "bias"):
                out[f"{d}{_EMB}.{theirs}.{p}"] = src[f"{ours}.{p}"]
        out[f"{d}{_EMB}.class_embedder.embedding_table.weight"] = src[
            "y_embedder.embedding_table.weight"
        ]
        for p in ("weight", "bias"):
            out[f"{d}norm1.linear.{p}"] = src[f"{s}adaLN_modulation.1.{p}"]
            q, k, v = src[f"{s}attn.qkv.{p}"].chunk(3, dim=0)
            out[f"{d}attn1.to_q.{p}"], out[f"{d}attn1.to_k.{p}"], out[f"{d}attn1.to_v.{p}"] = (
                q,
                k,
                v,
            )
            out[f"{d}attn1.to_out.0.{p}"] = src[f"{s}attn.proj.{p}"]
            out[f"{d}ff.net.0.proj.{p}"] = src[f"{s}mlp.fc1.{p}"]
            out[f"{d}ff.net.2.{p}"] = src[f"{s}mlp.fc2.{p}"]
    for p in ("weight", "bias"):
        out[f"proj_out_1.{p}"] = src[f"final_layer.adaLN_modulation.1.{p}"]
        out[f"proj_out_2.{p}"] = src[f"final_layer.linear.{p}"]
    return config, out


def dit_kwargs_from_diffusers(config: dict) -> dict:
    """DiTTransformer2DModel config -> DiT constructor arguments; a setting ditkit's blocks cannot
    represent raises naming the config key."""
    expect = {
        "norm_type": "ada_norm_zero",
        "activation_fn": "gelu-approximate",
        "norm_elementwise_affine": False,
        "attention_bias": True,
        "upcast_attention": False,
    }
    defaults = {"attention_bias": True, "upcast_attention": False}
    if config.get("_class_name") == LEGACY_CLASS_NAME:
        # Transformer2DModel's options that DiT folders leave unset (their defaults are DiT's).
        unset = dict(
            cross_attention_dim=None, double_self_attention=False, only_cross_attention=False
        )
        expect.update(unset)
        defaults.update(unset)
    bad = [
        f"{key}={config.get(key, defaults.get(key))!r} (ditkit needs {want!r})"
        for key, want in expect.items()
        if config.get(key, defaults.get(key)) != want
    ]
    if bad:
        raise ValueError(
            "this DiTTransformer2DModel cannot be represented by ditkit's DiT blocks: "
            + "; ".join(bad)
        )
    heads, head_dim = config["num_attention_heads"], config["attention_head_dim"]
    in_channels = config["in_channels"]
    out_channels = config.get("out_channels") or in_channels
    if out_channels not in (in_channels, 2 * in_channels):
        raise ValueError(
            f"out_channels={out_channels} with in_channels={in_channels}: ditkit's DiT outputs C "
            "or 2C (learned sigma) channels"
        )
    return dict(
        input_size=config["sample_size"],
        patch_size=config["patch_size"],
        in_channels=in_channels,
        hidden_size=heads * head_dim,
        depth=config["num_layers"],
        num_heads=heads,
        mlp_ratio=4.0,
        num_classes=config["num_embeds_ada_norm"],
        learn_sigma=out_channels == 2 * in_channels,
        timestep_freq_shift=1,
        mlp_norm_eps=float(config.get("norm_eps", 1e-5)),
    )


def dit_state_from_diffusers(
    state: dict[str, torch.Tensor], depth: int, pos_embed: torch.Tensor
) -> dict[str, torch.Tensor]:
    """DiTTransformer2DModel state_dict -> ditkit DiT state_dict (pos_embed: the model's fixed
    table, which diffusers does not store). Every block's embedder must equal block 0's."""
    state = dict(state)
    out = {
        "x_embedder.proj.weight": state.pop("pos_embed.proj.weight"),
        "x_embedder.proj.bias": state.pop("pos_embed.proj.bias"),
        "pos_embed": pos_embed,
    }
    first = f"transformer_blocks.0.{_EMB}."
    shared = {
        "timestep_embedder.linear_1.weight": "t_embedder.mlp.0.weight",
        "timestep_embedder.linear_1.bias": "t_embedder.mlp.0.bias",
        "timestep_embedder.linear_2.weight": "t_embedder.mlp.2.weight",
        "timestep_embedder.linear_2.bias": "t_embedder.mlp.2.bias",
        "class_embedder.embedding_table.weight": "y_embedder.embedding_table.weight",
    }
    for theirs, ours in shared.items():
        out[ours] = state[first + theirs]
    for i in range(depth):
        d, s = f"transformer_blocks.{i}.", f"blocks.{i}."
        for theirs in shared:
            tensor = state.pop(f"{d}{_EMB}.{theirs}")
            if not torch.equal(tensor, out[shared[theirs]]):
                raise ValueError(
                    f"{d}{_EMB}.{theirs} differs from block 0's: ditkit's DiT has ONE timestep and "
                    "class embedder shared by all blocks, so per-block embedders that differ "
                    "cannot be represented"
                )
        for p in ("weight", "bias"):
            out[f"{s}adaLN_modulation.1.{p}"] = state.pop(f"{d}norm1.linear.{p}")
            out[f"{s}attn.qkv.{p}"] = torch.cat(
                [state.pop(f"{d}attn1.to_{n}.{p}") for n in "qkv"], dim=0
            )
            out[f"{s}attn.proj.{p}"] = state.pop(f"{d}attn1.to_out.0.{p}")
            out[f"{s}mlp.fc1.{p}"] = state.pop(f"{d}ff.net.0.proj.{p}")
            out[f"{s}mlp.fc2.{p}"] = state.pop(f"{d}ff.net.2.{p}")
    for p in ("weight", "bias"):
        out[f"final_layer.adaLN_modulation.1.{p}"] = state.pop(f"proj_out_1.{p}")
        out[f"final_layer.linear.{p}"] = state.pop(f"proj_out_2.{p}")
    if state:
        raise ValueError(f"tensors ditkit's DiT has no place for: {sorted(state)[:8]}")
    return out


def dit_from_diffusers(config: dict, state: dict[str, torch.Tensor], **overrides) -> DiT:
    """Build the ditkit DiT of a DiTTransformer2DModel config and load its weights strictly."""
    model = DiT(**{**dit_kwargs_from_diffusers(config), **overrides})
    model.load_state_dict(
        dit_state_from_diffusers(state, model.depth, model.pos_embed), strict=True
    )
    return model
