"""ditkit MMDiT <-> diffusers `SD3Transformer2DModel` (diffusers/models/transformers/
transformer_sd3.py, JointTransformerBlock in models/attention.py): the key mapping and the config
translation, both directions, strict.

What differs between the two layouts:
  - diffusers splits each stream's fused QKV (image: to_q/to_k/to_v, text: add_q/k/v_proj).
  - the last block's text stream and the final layer use AdaLayerNormContinuous, whose modulation
    is (scale, shift); ditkit's is (shift, scale), so those rows swap halves.
  - the position table is a persistent buffer in diffusers (`pos_embed.pos_embed`, (1, M*M, D),
    M = pos_embed_max_size, centre-cropped to each input's grid) and rebuilt from the config in
    ditkit. diffusers computes its positions as arange(M) * base / M with base = sample_size /
    patch_size; import finds which table a folder holds (that one, or integer positions) and sets
    `pos_embed_base_size` so ditkit rebuilds the same table bit for bit.
  - SD3.5-medium's `dual_attention_layers` (MMDiT-X: a second, image-only attention `attn2` in
    those blocks, with 9 modulation vectors instead of 6) map to ditkit's dual image streams.
"""

from __future__ import annotations

import torch

from ditkit.models import MMDiT
from ditkit.models.embeddings import sincos_2d

CLASS_NAME = "SD3Transformer2DModel"
# Text tokens per sample when the folder says nothing (SD3: 77 CLIP + 77 T5 tokens); MMDiT uses
# context_len only to count FLOPs.
DEFAULT_CONTEXT_LEN = 154


def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    """(shift, scale) rows <-> (scale, shift) rows of a 2D-row modulation weight or bias."""
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def _pairs(prefix_ours: str, prefix_theirs: str, names: dict[str, str]):
    for ours, theirs in names.items():
        for p in ("weight", "bias"):
            yield f"{prefix_ours}{ours}.{p}", f"{prefix_theirs}{theirs}.{p}"


def _stream_names(text: bool, pre_only: bool) -> dict[str, str]:
    """ditkit stream submodule -> diffusers JointTransformerBlock submodule (weight + bias)."""
    if not text:
        return {
            "adaLN_modulation.1": "norm1.linear",
            "attn.proj": "attn.to_out.0",
            "mlp.fc1": "ff.net.0.proj",
            "mlp.fc2": "ff.net.2",
        }
    if pre_only:
        return {}  # the modulation swaps halves; handled by the caller
    return {
        "adaLN_modulation.1": "norm1_context.linear",
        "attn.proj": "attn.to_add_out",
        "mlp.fc1": "ff_context.net.0.proj",
        "mlp.fc2": "ff_context.net.2",
    }


_QKV = {
    False: ("attn.to_q", "attn.to_k", "attn.to_v"),
    True: tuple(f"attn.add_{n}_proj" for n in "qkv"),
}
_QK_NORM = {False: ("attn.norm_q", "attn.norm_k"), True: ("attn.norm_added_q", "attn.norm_added_k")}


def mmdit_to_diffusers(model: MMDiT, approximate: bool = False) -> tuple[dict, dict]:
    """A ditkit MMDiT -> (SD3Transformer2DModel config, its state_dict); exact, so `approximate`
    changes nothing (it is there for to_diffusers' one signature)."""
    if model.mlp_ratio != 4.0:
        raise ValueError(
            f"model.mlp_ratio={model.mlp_ratio}: diffusers' SD3 MLPs are 4x wide; "
            "an MMDiT with another ratio cannot be written as an SD3Transformer2DModel"
        )
    config = dict(
        sample_size=model.input_size,
        patch_size=model.patch_size,
        in_channels=model.in_channels,
        num_layers=model.depth,
        attention_head_dim=model.hidden_size // model.num_heads,
        num_attention_heads=model.num_heads,
        joint_attention_dim=model.context_dim,
        caption_projection_dim=model.hidden_size,
        pooled_projection_dim=model.pooled_dim,
        out_channels=model.out_channels,
        pos_embed_max_size=model.pos_embed_max_size,
        dual_attention_layers=list(model.dual_attention_layers),
        qk_norm="rms_norm" if model.qk_norm else None,
    )
    src = model.state_dict()
    m = model.pos_embed_max_size
    out = {"pos_embed.pos_embed": model.pos_embed.reshape(1, m * m, -1)}
    top = {
        "x_embedder.proj": "pos_embed.proj",
        "t_embedder.mlp.0": "time_text_embed.timestep_embedder.linear_1",
        "t_embedder.mlp.2": "time_text_embed.timestep_embedder.linear_2",
        "pooled_embedder.0": "time_text_embed.text_embedder.linear_1",
        "pooled_embedder.2": "time_text_embed.text_embedder.linear_2",
        "context_embedder": "context_embedder",
        "final_layer.linear": "proj_out",
    }
    for ours, theirs in _pairs("", "", top):
        out[theirs] = src[ours]
    for p in ("weight", "bias"):
        out[f"norm_out.linear.{p}"] = _swap_halves(src[f"final_layer.adaLN_modulation.1.{p}"])
    for i, blk in enumerate(model.blocks):
        d = f"transformer_blocks.{i}."
        for text, stream in ((False, "image"), (True, "text")):
            s = f"blocks.{i}.{stream}."
            pre_only = blk.text.pre_only and text
            for ours, theirs in _pairs(s, d, _stream_names(text, pre_only)):
                out[theirs] = src[ours]
            if pre_only:
                for p in ("weight", "bias"):
                    out[f"{d}norm1_context.linear.{p}"] = _swap_halves(
                        src[f"{s}adaLN_modulation.1.{p}"]
                    )
            for p in ("weight", "bias"):
                for name, part in zip(_QKV[text], src[f"{s}attn.qkv.{p}"].chunk(3, dim=0)):
                    out[f"{d}{name}.{p}"] = part
            if model.qk_norm:
                for name, ours in zip(_QK_NORM[text], ("q_norm", "k_norm")):
                    out[f"{d}{name}.weight"] = src[f"{s}attn.{ours}.weight"]
        if blk.image.dual:
            s = f"blocks.{i}.image.attn2."
            for p in ("weight", "bias"):
                for n, part in zip("qkv", src[f"{s}qkv.{p}"].chunk(3, dim=0)):
                    out[f"{d}attn2.to_{n}.{p}"] = part
                out[f"{d}attn2.to_out.0.{p}"] = src[f"{s}proj.{p}"]
            if model.qk_norm:
                for n in "qk":
                    out[f"{d}attn2.norm_{n}.weight"] = src[f"{s}{n}_norm.weight"]
    return config, out


def _table_base(config: dict, table: torch.Tensor, hidden: int) -> int | None:
    """The pos_embed_base_size whose rebuilt table equals the folder's (diffusers' formula first,
    then integer positions); a table neither formula gives (a trained one) raises."""
    m = config["pos_embed_max_size"]
    candidates = [config["sample_size"] // config["patch_size"], None]
    # Values lie in [-1, 1]: the same table stored in float32, or rounded to a half-precision
    # folder's dtype, is within that dtype's eps; the other formula is off by O(1) almost everywhere.
    atol = max(1e-6, torch.finfo(table.dtype).eps)
    for base in candidates:
        if table.shape == (1, m * m, hidden):
            rebuilt = sincos_2d(hidden, m, base).reshape(1, m * m, hidden)
            if torch.allclose(table.float(), rebuilt, rtol=0, atol=atol):
                return base
    raise ValueError(
        "pos_embed.pos_embed is not the sin-cos table of pos_embed_max_size="
        f"{m} (neither diffusers' scaled positions nor integer ones): ditkit rebuilds its position "
        "table from the config, so a learned or otherwise altered table cannot be represented"
    )


def mmdit_kwargs_from_diffusers(config: dict, state: dict[str, torch.Tensor]) -> dict:
    """SD3Transformer2DModel config (and its position table) -> MMDiT constructor arguments; a
    setting ditkit's blocks cannot represent raises naming the config key."""
    qk = config.get("qk_norm")
    if qk not in (None, "rms_norm"):
        raise ValueError(f"qk_norm={qk!r}: ditkit's MMDiT has RMSNorm QK-norm only (rms_norm)")
    heads, head_dim = config["num_attention_heads"], config["attention_head_dim"]
    hidden = heads * head_dim
    if config["caption_projection_dim"] != hidden:
        raise ValueError(
            f"caption_projection_dim={config['caption_projection_dim']} differs from the width "
            f"{hidden} (num_attention_heads x attention_head_dim): ditkit's MMDiT embeds the text "
            "to the block width"
        )
    in_channels = config["in_channels"]
    out_channels = config.get("out_channels") or in_channels
    if out_channels not in (in_channels, 2 * in_channels):
        raise ValueError(
            f"out_channels={out_channels} with in_channels={in_channels}: ditkit's MMDiT outputs C "
            "or 2C channels"
        )
    if config.get("pos_embed_max_size") is None:
        raise ValueError("pos_embed_max_size=None: ditkit's MMDiT needs the cropped sin-cos table")
    return dict(
        input_size=config["sample_size"],
        patch_size=config["patch_size"],
        in_channels=in_channels,
        depth=config["num_layers"],
        num_heads=heads,
        head_dim=head_dim,
        mlp_ratio=4.0,
        context_dim=config["joint_attention_dim"],
        pooled_dim=config["pooled_projection_dim"],
        context_len=DEFAULT_CONTEXT_LEN,
        pos_embed_max_size=config["pos_embed_max_size"],
        pos_embed_base_size=_table_base(config, state["pos_embed.pos_embed"], hidden),
        qk_norm=qk == "rms_norm",
        learn_sigma=out_channels == 2 * in_channels,
        dual_attention_layers=tuple(config.get("dual_attention_layers") or ()),
    )


def mmdit_state_from_diffusers(
    state: dict[str, torch.Tensor], depth: int, qk_norm: bool, dual: tuple[int, ...] = ()
) -> dict[str, torch.Tensor]:
    """SD3Transformer2DModel state_dict -> ditkit MMDiT state_dict (the position table is dropped:
    ditkit rebuilds it, and the kwargs check made sure it is the same)."""
    state = dict(state)
    state.pop("pos_embed.pos_embed")
    out = {}
    top = {
        "x_embedder.proj": "pos_embed.proj",
        "t_embedder.mlp.0": "time_text_embed.timestep_embedder.linear_1",
        "t_embedder.mlp.2": "time_text_embed.timestep_embedder.linear_2",
        "pooled_embedder.0": "time_text_embed.text_embedder.linear_1",
        "pooled_embedder.2": "time_text_embed.text_embedder.linear_2",
        "context_embedder": "context_embedder",
        "final_layer.linear": "proj_out",
    }
    for ours, theirs in _pairs("", "", top):
        out[ours] = state.pop(theirs)
    for p in ("weight", "bias"):
        out[f"final_layer.adaLN_modulation.1.{p}"] = _swap_halves(state.pop(f"norm_out.linear.{p}"))
    for i in range(depth):
        d = f"transformer_blocks.{i}."
        for text, stream in ((False, "image"), (True, "text")):
            s = f"blocks.{i}.{stream}."
            pre_only = text and i == depth - 1
            for ours, theirs in _pairs(s, d, _stream_names(text, pre_only)):
                out[ours] = state.pop(theirs)
            if pre_only:
                for p in ("weight", "bias"):
                    out[f"{s}adaLN_modulation.1.{p}"] = _swap_halves(
                        state.pop(f"{d}norm1_context.linear.{p}")
                    )
            for p in ("weight", "bias"):
                out[f"{s}attn.qkv.{p}"] = torch.cat(
                    [state.pop(f"{d}{name}.{p}") for name in _QKV[text]], dim=0
                )
            if qk_norm:
                for name, ours in zip(_QK_NORM[text], ("q_norm", "k_norm")):
                    out[f"{s}attn.{ours}.weight"] = state.pop(f"{d}{name}.weight")
        if i in dual:
            s = f"blocks.{i}.image.attn2."
            for p in ("weight", "bias"):
                out[f"{s}qkv.{p}"] = torch.cat(
                    [state.pop(f"{d}attn2.to_{n}.{p}") for n in "qkv"], dim=0
                )
                out[f"{s}proj.{p}"] = state.pop(f"{d}attn2.to_out.0.{p}")
            if qk_norm:
                for n in "qk":
                    out[f"{s}{n}_norm.weight"] = state.pop(f"{d}attn2.norm_{n}.weight")
    if state:
        raise ValueError(f"tensors ditkit's MMDiT has no place for: {sorted(state)[:8]}")
    return out


def mmdit_from_diffusers(config: dict, state: dict[str, torch.Tensor], **overrides) -> MMDiT:
    """Build the ditkit MMDiT of an SD3Transformer2DModel config and load its weights strictly."""
    model = MMDiT(**{**mmdit_kwargs_from_diffusers(config, state), **overrides})
    model.load_state_dict(
        mmdit_state_from_diffusers(state, model.depth, model.qk_norm, model.dual_attention_layers),
        strict=True,
    )
    return model
