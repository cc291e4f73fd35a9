"""Feature statistics that merge exactly across ranks, and the metrics computed from them.

FID (Heusel et al. 2017, eq. 6) needs only the mean and covariance of the features. Each rank keeps
the sum, the sum of outer products (float64) and the count of its own features; summing those three
over ranks gives the statistics of the union, so N samples on 2 ranks score the same as on 1.
IS, KID and precision/recall are torch-fidelity's functions; FID is its formula with a symmetric
eigensolver.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
from torch_fidelity.metric_isc import isc_features_to_metric
from torch_fidelity.metric_kid import kid_features_to_metric
from torch_fidelity.metric_prc import prc_features_to_metric


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class FeatureStats:
    """Running sum, sum of outer products and count of features of dimension `dim` (all float64)."""

    def __init__(self, dim: int = 2048):
        self.total = torch.zeros(dim, dtype=torch.float64)
        self.outer = torch.zeros(dim, dim, dtype=torch.float64)
        self.count = 0

    def update(self, features: torch.Tensor) -> None:
        """features: (N, dim)."""
        f = features.detach().to("cpu", torch.float64)
        self.total += f.sum(0)
        self.outer += f.T @ f
        self.count += f.shape[0]

    def all_reduce(self, device: torch.device | str = "cpu") -> None:
        """Sum the three statistics over all ranks (no-op outside torch.distributed); every rank
        ends with the union."""
        if not _distributed():
            return
        packed = torch.cat(
            [
                self.total,
                self.outer.flatten(),
                torch.tensor([float(self.count)], dtype=torch.float64),
            ]
        )
        packed = packed.to(device)
        dist.all_reduce(packed)
        packed = packed.cpu()
        dim = self.total.numel()
        self.total = packed[:dim].clone()
        self.outer = packed[dim : dim + dim * dim].view(dim, dim).clone()
        self.count = int(round(packed[-1].item()))

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        """mu (dim,) and the unbiased covariance sigma (dim, dim), float64 — what np.cov(features,
        rowvar=False) gives."""
        if self.count < 2:
            raise ValueError(f"FID needs at least 2 samples, got {self.count}")
        mu = self.total / self.count
        sigma = (self.outer - self.count * torch.outer(mu, mu)) / (self.count - 1)
        return mu.numpy(), sigma.numpy()


def sqrtm_psd(sigma: np.ndarray) -> np.ndarray:
    """The symmetric square root S (S @ S = sigma) of a PSD matrix (D, D), float64, from one
    eigendecomposition."""
    lam, u = torch.linalg.eigh(torch.from_numpy(np.asarray(sigma, np.float64)))
    return (
        (u * lam.clamp(min=0).sqrt()) @ u.T
    ).numpy()  # clamp: rounding makes ~0 eigenvalues slightly negative


def frechet_distance(
    mu1: np.ndarray,
    sigma1: np.ndarray,
    mu2: np.ndarray,
    sigma2: np.ndarray,
    sqrt2: np.ndarray | None = None,
) -> float:
    """FID between two Gaussians (Heusel et al. 2017): |mu1 - mu2|^2 + tr(s1 + s2 - 2 (s1
    s2)^(1/2)), float64.

    tr (s1 s2)^(1/2) is the sum of the square roots of the eigenvalues of s1 s2, which are those of
    the symmetric S2 s1 S2 with S2 = s2^(1/2). A symmetric eigensolver is several times faster than
    the general one torch-fidelity's `fid_statistics_to_metric` uses (the tests check both agree),
    and with `sqrt2`, a reference's square root computed once, a training-time FID costs one
    eigvalsh.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    root = torch.from_numpy(sqrtm_psd(sigma2) if sqrt2 is None else np.asarray(sqrt2, np.float64))
    eig = torch.linalg.eigvalsh(root @ torch.from_numpy(sigma1) @ root)
    tr_covmean = eig.clamp(min=0).sqrt().sum().item()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def inception_score(logits: torch.Tensor, splits: int = 10) -> tuple[float, float]:
    """logits: (N, 1008) unbiased Inception logits -> IS mean and std over `splits` (Salimans et al.
    2016).

    Fewer splits when N < 2 * splits: a split of one sample always scores exactly 1.
    """
    splits = max(1, min(splits, logits.shape[0] // 2))
    out = isc_features_to_metric(logits.cpu(), splits=splits, shuffle=True, rng_seed=2020)
    return out["inception_score_mean"], out["inception_score_std"]


def kernel_inception_distance(
    fake: torch.Tensor, real: torch.Tensor, subsets: int = 100, subset_size: int = 1000
) -> tuple[float, float]:
    """fake (N, 2048), real (M, 2048) -> KID mean and std (Binkowski et al. 2018); subsets shrink to
    the smaller set."""
    size = min(subset_size, fake.shape[0], real.shape[0])
    # torch-fidelity's defaults otherwise: cubic polynomial kernel, rng seed 2020.
    out = kid_features_to_metric(
        fake.cpu(), real.cpu(), kid_subsets=subsets, kid_subset_size=size, verbose=False
    )
    return out["kernel_inception_distance_mean"], out["kernel_inception_distance_std"]


def precision_recall(
    fake: torch.Tensor, real: torch.Tensor, neighborhood: int = 3
) -> tuple[float, float]:
    """fake (N, 2048), real (M, 2048) -> improved precision and recall (Kynkaanniemi et al.
    2019)."""
    out = prc_features_to_metric(
        fake.cpu(), real.cpu(), prc_neighborhood=neighborhood, verbose=False
    )
    return out["precision"], out["recall"]


def all_gather_rows(x: torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    """x: (n_r, D) on each rank -> (sum n_r, D) on every rank, rank 0's rows first (no-op outside
    torch.distributed)."""
    if not _distributed():
        return x
    world = dist.get_world_size()
    n = torch.tensor([x.shape[0]], device=device)
    counts = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(counts, n)
    longest = int(max(c.item() for c in counts))
    padded = torch.zeros(longest, *x.shape[1:], dtype=x.dtype, device=device)
    padded[: x.shape[0]] = x.to(device)
    parts = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(c.item())] for p, c in zip(parts, counts)]).cpu()
