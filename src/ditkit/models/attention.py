"""Transformer parts shared by the DiT and MMDiT: norms, attention through SDPA, MLPs."""

import math

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
    """x: (N, heads, T, hd); rope: (2, T, hd) cos/sin tables. Rotates channel pairs (i, i +
    hd/2)."""
    cos, sin = rope[0].to(x.dtype), rope[1].to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(hd)) v. q: (N, heads, T, hd), k and v: (N, heads, S, hd) -> (N, heads,
    T, hd).

    F.scaled_dot_product_attention everywhere (flash attention on GPUs), except bf16 on CPU for
    sequences up to 1024 tokens: there PyTorch's CPU flash attention is about 2x slower than two
    bf16 matmuls and a softmax (DiT-S/2, batch 8, 256 tokens: 17.3 vs 9.0 ms forward + backward per
    block; benchmarks/README.md). The softmax accumulates in fp32 inside the kernel either way.
    """
    if q.device.type == "cpu" and q.dtype == torch.bfloat16 and k.shape[-2] <= 1024:
        scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # (N, heads, T, S)
        return scores.softmax(dim=-1) @ v
    return F.scaled_dot_product_attention(q, k, v)


class Attention(nn.Module):
    """Multi-head self-attention with a fused QKV projection; optional QK-norm (RMSNorm per head,
    as in SD3.5 / LightningDiT) and 2-D RoPE. Attention itself is `attention` (SDPA)."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = False, out_proj: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden_size {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        # out_proj=False: the stream only feeds keys/values to a joint attention (MMDiT's last text
        # block).
        self.proj = nn.Linear(dim, dim) if out_proj else None
        head_dim = dim // num_heads
        self.q_norm = nn.RMSNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()

    def heads_qkv(
        self, x: torch.Tensor, rope: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: (N, T, D) -> q, k, v, each (N, heads, T, hd), QK-norm and RoPE applied."""
        n, t, d = x.shape
        q, k, v = (
            self.qkv(x).view(n, t, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        )
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        return q, k, v

    def forward(self, x: torch.Tensor, rope: torch.Tensor | None = None) -> torch.Tensor:
        """x: (N, T, D) -> (N, T, D)."""
        n, t, d = x.shape
        out = attention(*self.heads_qkv(x, rope))  # (N, heads, T, hd)
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
        out = attention(q, self.k_norm(k), v)
        return self.proj(out.transpose(1, 2).reshape(n, t, d))


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU, tanh approximation (as DiT): 0.5 x (1 + tanh(z)), z = sqrt(2/pi) (x + 0.044715 x^3).

    Under torch.compile it is written as the identical x * sigmoid(2z): the compiler fuses that into
    one pass, where its CPU lowering of tanh runs ~2.5x slower (DiT-S/2 MLP, bf16: 4.9 vs 13 ms
    forward + backward). Eager PyTorch has one kernel for the tanh form, faster than the sigmoid
    form's four.
    """
    if torch.compiler.is_compiling():
        return x * torch.sigmoid(2 * math.sqrt(2 / math.pi) * (x + 0.044715 * x * x * x))
    return F.gelu(x, approximate="tanh")


class Mlp(nn.Module):
    """fc1 -> GELU (tanh approximation, as DiT) -> fc2."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(gelu_tanh(self.fc1(x)))


class SwiGLU(nn.Module):
    """SwiGLU MLP (Shazeer, 2020): fc2(silu(x W1) * x W3), with the hidden width scaled by 2/3 so
    the parameter count matches the GELU MLP of the same mlp_ratio (as LLaMA / LightningDiT),
    rounded up to a multiple of `multiple_of` (JiT: 1, i.e. int(2/3 hidden) as LTH14/JiT's
    SwiGLUFFN). dropout: on the gated hidden units, before fc2 (JiT's proj_dropout)."""

    def __init__(self, dim: int, hidden: int, multiple_of: int = 8, dropout: float = 0.0):
        super().__init__()
        hidden = multiple_of * ((2 * hidden // 3 + multiple_of - 1) // multiple_of)
        self.fc1 = nn.Linear(dim, 2 * hidden)  # gate and value, fused
        self.fc2 = nn.Linear(hidden, dim)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, value = self.fc1(x).chunk(2, dim=-1)
        return self.fc2(self.dropout(F.silu(gate) * value))


def make_mlp(kind: str, dim: int, hidden: int) -> nn.Module:
    if kind == "gelu":
        return Mlp(dim, hidden)
    if kind == "swiglu":
        return SwiGLU(dim, hidden)
    raise ValueError(f"unknown mlp {kind!r}; valid: gelu, swiglu")
