"""Metric state merged over 2 gloo processes equals the state of 1 process (no Inception: given features)."""

import json

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ditkit.evaluation import InceptionMetrics, Reference, plan_batches

N, BATCH = 10, 3  # uneven: rank 0 gets batches 0, 2 (6 samples), rank 1 batches 1, 3 (4 samples)


def features():
    g = torch.Generator().manual_seed(0)
    pool = torch.rand(N, 2048, generator=g, dtype=torch.float64).float()
    logits = 4 * torch.randn(N, 1008, generator=g)
    real = torch.rand(12, 2048, generator=g)
    reference = Reference(real.double().mean(0).numpy(), np.cov(real.double().numpy(), rowvar=False), 8, 12, "", "t",
                          features=real.numpy())
    return pool, logits, reference


def score(rank: int, world: int) -> tuple[dict, tuple[np.ndarray, np.ndarray]]:
    """The metrics (FID left out: its eigensolver is the slow part and it only reads mu, sigma) and mu, sigma."""
    pool, logits, reference = features()
    metrics = InceptionMetrics(("is", "kid", "prc"))
    for start, stop in plan_batches(N, BATCH, rank, world):
        metrics.add(pool[start:stop], logits[start:stop], start)
    return metrics.compute(reference), metrics.stats.mean_cov()


def _worker(rank: int, world: int, init: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        result, (mu, sigma) = score(rank, world)
        with open(f"{out}.{rank}", "w") as f:
            json.dump(result, f)
        np.savez(f"{out}.{rank}.npz", mu=mu, sigma=sigma)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_equal_one(tmp_path):
    one, (mu, sigma) = score(0, 1)
    mp.spawn(_worker, args=(2, f"file://{tmp_path / 'pg'}", str(tmp_path / "out")), nprocs=2, join=True)
    for rank in range(2):
        two = json.loads((tmp_path / f"out.{rank}").read_text())
        assert two["num_samples"] == N
        # Sums over ranks are the sums over the whole: mu and sigma agree up to float64 summation order.
        with np.load(tmp_path / f"out.{rank}.npz") as z:
            np.testing.assert_allclose(z["mu"], mu, rtol=1e-13)
            np.testing.assert_allclose(z["sigma"], sigma, rtol=1e-10, atol=1e-14)
        # Gathered rows come back in global sample order, so the order-dependent metrics agree exactly.
        assert (two["is"], two["kid"], two["precision"], two["recall"]) == (one["is"], one["kid"], one["precision"], one["recall"])
