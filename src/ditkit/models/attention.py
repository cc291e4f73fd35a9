"""Transformer parts shared by the DiT and MMDiT: norms, attention through SDPA, MLPs."""

import torch
import torch.nn.functional as F
from torch import nn


def make_norm(kind: str, dim: int, affine: bool = False) -> nn.Module:
    """Block norm without learned affine (the adaLN modulation supplies scale and shift)."""
    if kind == "layernorm":
        return nn.LayerNorm(dim, elementwise_affine=affine, eps=1e-6)
    if kind == "rmsnorm":
        return nn.RMSNorm(dim, elementwise_affine=affine, eps=1e-6)
    raise ValueError(f"unknown norm {kind!r}; valid: layernorm, rmsnorm")


def apply_rope(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """x: (N, heads, T, hd); rope: (2, T, hd) cos/sin tables. Rotates channel pairs (i, i + hd/2)."""
    cos, sin = rope[0].to(x.dtype), rope[1].to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class Attention(nn.Module):
    """Multi-head self-attention with a fused QKV projection; optional QK-norm (RMSNorm per head,
    as in SD3.5 / LightningDiT) and 2-D RoPE. Attention itself is F.scaled_dot_product_attention."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = False, out_proj: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden_size {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        # out_proj=False: the stream only feeds keys/values to a joint attention (MMDiT's last text block).
        self.proj = nn.Linear(dim, dim) if out_proj else None
        head_dim = dim // num_heads
        self.q_norm = nn.RMSNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()

    def heads_qkv(
        self, x: torch.Tensor, rope: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: (N, T, D) -> q, k, v, each (N, heads, T, hd), QK-norm and RoPE applied."""
        n, t, d = x.shape
        q, k, v = self.qkv(x).view(n, t, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        return q, k, v

    def forward(self, x: torch.Tensor, rope: torch.Tensor | None = None) -> torch.Tensor:
        """x: (N, T, D) -> (N, T, D)."""
        n, t, d = x.shape
        out = F.scaled_dot_product_attention(*self.heads_qkv(x, rope))  # (N, heads, T, hd)
        return self.proj(out.transpose(1, 2).reshape(n, t, d))


class CrossAttention(nn.Module):
    """Queries from image tokens x: (N, T, D), keys/values from conditioning tokens c: (N, S, D)."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = False):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        head_dim = dim // num_heads
        self.q_norm = nn.RMSNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        hd = d // self.num_heads
        q = self.q_norm(self.q(x).view(n, t, self.num_heads, hd).transpose(1, 2))
        k, v = self.kv(c).view(n, c.shape[1], 2, self.num_heads, hd).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, self.k_norm(k), v)
        return self.proj(out.transpose(1, 2).reshape(n, t, d))


class Mlp(nn.Module):
    """fc1 -> GELU (tanh approximation, as DiT) -> fc2."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class SwiGLU(nn.Module):
    """SwiGLU MLP (Shazeer, 2020): fc2(silu(x W1) * x W3), with the hidden width scaled by 2/3 so the
    parameter count matches the GELU MLP of the same mlp_ratio (as LLaMA / LightningDiT)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        hidden = 8 * ((2 * hidden // 3 + 7) // 8)
        self.fc1 = nn.Linear(dim, 2 * hidden)  # gate and value, fused
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, value = self.fc1(x).chunk(2, dim=-1)
        return self.fc2(F.silu(gate) * value)


def make_mlp(kind: str, dim: int, hidden: int) -> nn.Module:
    if kind == "gelu":
        return Mlp(dim, hidden)
    if kind == "swiglu":
        return SwiGLU(dim, hidden)
    raise ValueError(f"unknown mlp {kind!r}; valid: gelu, swiglu")
