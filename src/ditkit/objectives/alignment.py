"""Representation alignment terms: REPA and iREPA, for both objectives (flow and DDPM).

REPA (Yu et al., ICLR 2025, arXiv 2410.06940; sihyun-yu/REPA): a trainable projector maps the
DiT's hidden state after block `depth` (8 of SiT-XL/2's 28) to the feature width of a frozen
vision encoder run on the clean image, and the loss is minus the patch-mean cosine similarity
(paper eq. 8; `SILoss.__call__` in loss.py, the projector `build_mlp` in models/sit.py: Linear,
SiLU, Linear, SiLU, Linear, 2048 wide), added with weight 0.5 (eq. 9, lambda).

iREPA (Singh et al. 2025, arXiv 2512.10794; End2End-Diffusion/iREPA README): the same loss with a
3 x 3 convolutional projector on the token grid instead of the MLP, and the teacher's features
spatially normalised per image and channel over the patches, z <- (z - gamma mean_T z) /
(std_T z + 1e-6) (gamma: the release's `--zscore-alpha`, 0.6), which keeps the spatial structure
and removes the global component every patch shares.

Each term is an `ditkit.objectives.Term`: its projector trains with the backbone (the optimizer,
FSDP2 sharding, checkpoints, exact resume) and is logged as its own loss part; the encoder is a
`ditkit.models.encoders.FrozenEncoder`, kept out of the module tree (not trained, not saved). The
image is the batch's "image" field: (N, 3, S, S) uint8, from shards made with keep_images=true.
Sampling uses neither.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ditkit.models.encoders import FrozenEncoder, check_grids, match_grid

from .terms import Term, TermInputs


def mlp_projector(width: int, hidden: int, out: int) -> nn.Sequential:
    """REPA's projector (models/sit.py `build_mlp`): 3 linear layers with SiLU between."""
    return nn.Sequential(
        nn.Linear(width, hidden),
        nn.SiLU(),
        nn.Linear(hidden, hidden),
        nn.SiLU(),
        nn.Linear(hidden, out),
    )


def negative_cosine(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(N, T, E), (N, T, E) -> (N,): minus the mean over the T patches of the cosine similarity
    (REPA eq. 8), in float32 at least."""
    dtype = torch.promote_types(pred.dtype, torch.float32)
    cos = F.cosine_similarity(pred.to(dtype), target.to(dtype), dim=-1, eps=1e-8)
    return -cos.mean(1)


def spatial_normalize(z: torch.Tensor, gamma: float) -> torch.Tensor:
    """iREPA's spatial normalisation of (N, T, E) teacher features over the T patches."""
    z = z - gamma * z.mean(dim=1, keepdim=True)
    return z / (z.std(dim=1, keepdim=True) + 1e-6)


class REPA(Term):
    """REPA: weight * (-mean_patches cos(projector(h_depth), encoder(image))).

    encoder: the frozen teacher (config group `encoder=`); depth: the block whose output is
    aligned (1-based; REPA: 8 for XL/2); projector_dim: the MLP's width (2048). Token backbones
    with a square patch grid (DiT: `hidden_size`, `input_size`, `patch_size`) only; the encoder's
    grid is pooled / repeated to the backbone's (`check_grids`)."""

    def __init__(
        self,
        encoder: FrozenEncoder | None,
        depth: int = 8,
        weight: float = 0.5,
        projector_dim: int = 2048,
    ) -> None:
        super().__init__(weight)
        if encoder is None:
            raise ValueError(
                f"{type(self).__name__} aligns with a frozen vision encoder: choose one, e.g. "
                "encoder=dinov2_b (shards extracted with keep_images=true)"
            )
        if depth < 1:
            raise ValueError(f"alignment.depth counts blocks from 1, got {depth}")
        self.encoder = encoder  # a plain attribute: not a submodule, so never trained or saved
        self.depths = (int(depth),)
        self.projector_dim = int(projector_dim)

    def bind(self, model: nn.Module) -> None:
        name = type(self).__name__
        if not all(hasattr(model, k) for k in ("hidden_size", "input_size", "patch_size")):
            raise ValueError(
                f"{name} aligns the tokens of a patch-grid transformer (DiT); "
                f"{type(model).__name__} has no hidden_size / input_size / patch_size"
            )
        self.grid = int(model.input_size) // int(model.patch_size)
        check_grids(self.encoder, self.grid, f"alignment ({name})")
        self.build_projector(int(model.hidden_size), self.encoder.dim)

    def build_projector(self, width: int, out: int) -> None:
        self.projector = mlp_projector(width, self.projector_dim, out)

    def project(self, tokens: torch.Tensor) -> torch.Tensor:
        """(N, T, D) image tokens -> (N, T, E)."""
        return self.projector(tokens)

    def teacher(self, batch) -> torch.Tensor:
        """(N, T, E) float32 encoder patch features of the batch's images on the backbone's grid."""
        if "image" not in batch:
            raise KeyError(
                f"{type(self).__name__} needs the batch's 'image' field (uint8 crops): train on "
                "shards extracted with keep_images=true, with an encoder= chosen (sets data.images)"
            )
        return match_grid(self.encoder(batch["image"]).patches, self.grid)

    def image_tokens(self, inputs: TermInputs) -> torch.Tensor:
        """(N, T, D): the last T = grid^2 tokens of block `depth`'s output (in-context blocks
        prepend condition tokens, REG its class token)."""
        hidden = inputs.hidden[self.depths[0]]
        return hidden[:, hidden.shape[1] - self.grid**2 :]

    def forward(self, inputs: TermInputs) -> torch.Tensor:
        return negative_cosine(self.project(self.image_tokens(inputs)), self.teacher(inputs.batch))


class IREPA(REPA):
    """iREPA: REPA with a convolutional projector (kernel_size, default 3, 'same' padding, on the
    grid x grid token map) and spatially normalised teacher features (gamma, default 0.6)."""

    def __init__(
        self,
        encoder: FrozenEncoder | None,
        depth: int = 8,
        weight: float = 0.5,
        kernel_size: int = 3,
        gamma: float = 0.6,
    ) -> None:
        super().__init__(encoder, depth, weight)
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"alignment.kernel_size must be odd and >= 1, got {kernel_size}")
        self.kernel_size, self.gamma = int(kernel_size), float(gamma)

    def build_projector(self, width: int, out: int) -> None:
        k = self.kernel_size
        self.projector = nn.Conv2d(width, out, kernel_size=k, padding=k // 2)

    def project(self, tokens: torch.Tensor) -> torch.Tensor:
        n, t, d = tokens.shape
        grid = tokens.transpose(1, 2).reshape(n, d, self.grid, self.grid)  # raster order
        return self.projector(grid).flatten(2).transpose(1, 2)

    def teacher(self, batch) -> torch.Tensor:
        return spatial_normalize(super().teacher(batch), self.gamma)
