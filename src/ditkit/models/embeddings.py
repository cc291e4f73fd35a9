"""Input embedders of the DiT (Peebles & Xie, 2023, Fig. 3): patches, timesteps, class labels,
and the fixed position tables (2-D sin-cos, and 2-D rotary for the RoPE option)."""

import math

import torch
from torch import nn


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches -> tokens. x: (N, C, H, W) -> (N, T, D), T = (H/p)(W/p)."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    """Scalar timesteps -> (N, D): sinusoidal features (as in the Transformer / ADM) then a 2-layer
    MLP. freq_shift: the frequencies are max_period^(-i / (half - freq_shift)); 0 is DiT's
    reference, 1 is what diffusers' DiTTransformer2DModel hard-codes (its
    CombinedTimestepLabelEmbeddings: Timesteps(downscale_freq_shift=1))."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256, freq_shift: int = 0):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.freq_shift = freq_shift
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )

    @staticmethod
    def sinusoidal(
        t: torch.Tensor, dim: int, max_period: float = 10000.0, freq_shift: int = 0
    ) -> torch.Tensor:
        """t: (N,) possibly fractional -> (N, dim) = [cos(t w_i), sin(t w_i)], w_i =
        max_period^(-i/(half - freq_shift))."""
        half = dim // 2
        freqs = torch.exp(
            -math.log(max_period)
            * torch.arange(half, dtype=torch.float32, device=t.device)
            / (half - freq_shift)
        )
        # float32 at least (bf16 times would round t); float64 stays float64 (exact JVP tests).
        dtype = torch.float64 if t.dtype == torch.float64 else torch.float32
        args = t[:, None].to(dtype) * freqs[None].to(dtype)
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
        return emb

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        freq = self.sinusoidal(t, self.frequency_embedding_size, freq_shift=self.freq_shift)
        return self.mlp(freq.to(self.mlp[0].weight.dtype))


# The optional scalar inputs beyond t: forward keyword -> (embedder attribute, build option).
# MeanFlow's second time (r or t - r) and improved MeanFlow's guidance scale.
EXTRA_TIMES = {"t2": ("t2_embedder", "second_time"), "w": ("w_embedder", "guidance_input")}


def extra_time_embedders(model: nn.Module) -> dict[str, TimestepEmbedder]:
    """{forward keyword: embedder} of the extra scalar inputs a backbone was built with."""
    return {
        key: getattr(model, name) for key, (name, _) in EXTRA_TIMES.items() if hasattr(model, name)
    }


def add_extra_times(model: nn.Module, t_emb: torch.Tensor, **values) -> torch.Tensor:
    """t_emb: (N, D) plus the embedding of each extra input given (t2=, w=: (N,) or None); the
    official MeanFlow DiT sums them (Gsunshine/meanflow models_dit.py, DiT.__call__: t + h + y).
    An input is required when the model was built with its option and refused otherwise."""
    embedders = extra_time_embedders(model)
    for key, value in values.items():
        if (value is None) != (key not in embedders):
            option = EXTRA_TIMES[key][1]
            raise ValueError(
                f"{type(model).__name__}.forward got {key}="
                f"{'None' if value is None else 'a tensor'} but the model was built with "
                f"{option}={key in embedders}: build it with model.{option}={value is not None}"
            )
        if value is not None:
            t_emb = t_emb + embedders[key](value)
    return t_emb


class LabelEmbedder(nn.Module):
    """Class labels -> (N, D). Row `num_classes` is the null class used for classifier-free
    guidance (Ho & Salimans, 2022); in training, labels are replaced by it with prob.
    `dropout_prob`."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def forward(self, labels: torch.Tensor, train: bool) -> torch.Tensor:
        if train:
            labels = drop_labels(labels, self.num_classes, self.dropout_prob)
        return self.embedding_table(labels)


def drop_labels(labels: torch.Tensor, null_label: int, prob: float) -> torch.Tensor:
    """Label dropout for classifier-free guidance: labels (N,) each replaced by `null_label` with
    probability `prob`, drawn from the global torch RNG (what makes resumed training exact)."""
    if prob <= 0:
        return labels
    drop = torch.rand(labels.shape[0], device=labels.device) < prob
    return torch.where(drop, null_label, labels)


def null_labels(labels: torch.Tensor, embedder: nn.Embedding | LabelEmbedder) -> torch.Tensor:
    """labels (N,) -> (N,) all the null class (index num_classes), checking the table has that row
    (a model built with class_dropout_prob=0 never learned one, so it cannot be guided)."""
    table = embedder.embedding_table if isinstance(embedder, LabelEmbedder) else embedder
    null = table.num_embeddings - 1
    if isinstance(embedder, LabelEmbedder) and embedder.dropout_prob <= 0:
        raise ValueError(
            "this model was built with class_dropout_prob=0, so it has no null class and cannot "
            "be sampled with classifier-free guidance: use cfg_scale=1"
        )
    return torch.full_like(labels, null)


def sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """pos: (M,) -> (M, dim) = [sin(pos w), cos(pos w)], w_i = 10000^(-2i/dim) (MAE's table)."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
    out = pos.double()[:, None] * omega[None]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_2d(dim: int, grid_size: int, base_size: int | None = None) -> torch.Tensor:
    """Fixed 2-D position table (T, dim), T = grid_size^2 in row-major token order.
    Half the channels encode the column, half the row, matching the official checkpoints.
    base_size: positions are arange(grid_size) * base_size / grid_size, computed in float32 as
    diffusers' get_2d_sincos_pos_embed does (its SD3 table uses base_size = sample_size / patch);
    None: the integer positions."""
    coords = torch.arange(grid_size, dtype=torch.float64)
    if base_size is not None:
        coords = (torch.arange(grid_size, dtype=torch.float32) / (grid_size / base_size)).double()
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    return torch.cat(
        [sincos_1d(dim // 2, cols.flatten()), sincos_1d(dim // 2, rows.flatten())], dim=1
    ).float()


def rope_2d(
    head_dim: int, grid_size: int, prefix_tokens: int = 0, theta: float = 10000.0
) -> torch.Tensor:
    """Rotary tables for 2-D RoPE (Su et al., 2021; axial form as in LightningDiT): the first half
    of each head's channels rotates with the row, the second with the column. Returns (2, T,
    head_dim): cos, sin. `prefix_tokens` (e.g. conditioning tokens) get the identity rotation."""
    if head_dim % 4:
        raise ValueError(f"2-D RoPE needs head_dim divisible by 4, got {head_dim}")
    quarter = head_dim // 4
    inv_freq = 1.0 / theta ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    coords = torch.arange(grid_size, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    angles = torch.cat(
        [rows.flatten()[:, None] * inv_freq, cols.flatten()[:, None] * inv_freq], dim=1
    )
    angles = torch.cat(
        [angles, angles], dim=1
    )  # (T, head_dim): pairs (i, i + head_dim/2) share an angle
    angles = torch.cat([torch.zeros(prefix_tokens, head_dim, dtype=torch.float64), angles], dim=0)
    return torch.stack([angles.cos(), angles.sin()]).float()
