"""FID machinery without Inception: statistics, closed-form metrics, reference files, sampling plan,
ADM npz."""

import contextlib

import numpy as np
import pytest
import torch

from ditkit.evaluation import (
    FeatureStats,
    PartStore,
    Reference,
    balanced_labels,
    check_reference,
    frechet_distance,
    inception_score,
    load_reference,
    plan_batches,
    read_adm_reference,
    sample_noise,
    save_reference,
    to_uint8,
    write_adm_npz,
)
from ditkit.evaluation.samples_io import image_grid
from ditkit.evaluation.sampling import generate_batch


def test_feature_stats_equal_numpy_mean_and_cov():
    f = torch.randn(50, 6, dtype=torch.float64) * torch.arange(1, 7) + 3
    s = FeatureStats(dim=6)
    s.update(f[:17])
    s.update(f[17:])
    mu, sigma = s.mean_cov()
    np.testing.assert_allclose(mu, f.numpy().mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(f.numpy(), rowvar=False), rtol=1e-10, atol=1e-12)


def test_merged_sums_equal_stats_of_the_union():
    """What all_reduce does across ranks: adding the three sums of two halves gives the statistics of
    the whole."""
    f = torch.randn(40, 5)
    a, b, whole = FeatureStats(5), FeatureStats(5), FeatureStats(5)
    a.update(f[:13])
    b.update(f[13:])
    whole.update(f)
    a.total += b.total
    a.outer += b.outer
    a.count += b.count
    for x, y in zip(a.mean_cov(), whole.mean_cov()):
        np.testing.assert_allclose(x, y, rtol=1e-12, atol=1e-14)


def test_frechet_distance_closed_form():
    # Diagonal covariances: FID = |mu1 - mu2|^2 + sum (sqrt(s1) - sqrt(s2))^2.
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    s1, s2 = np.diag([1.0, 4.0, 9.0]), np.diag([4.0, 4.0, 1.0])
    expected = 1 + 0 + 4 + (1 - 2) ** 2 + 0 + (3 - 1) ** 2
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-12)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("n", [200, 10])  # full rank, and rank-deficient as with few samples
def test_frechet_distance_equals_torch_fidelity_formula(n):
    from torch_fidelity.metric_fid import fid_statistics_to_metric

    rng = np.random.default_rng(n)
    x, y = (
        rng.standard_normal((n, 64)) + 0.5,
        rng.standard_normal((n + 3, 64)) @ rng.standard_normal((64, 64)) / 8,
    )
    s1 = {"mu": x.mean(0), "sigma": np.cov(x, rowvar=False)}
    s2 = {"mu": y.mean(0), "sigma": np.cov(y, rowvar=False)}
    theirs = fid_statistics_to_metric(s1, s2, verbose=False)["frechet_inception_distance"]
    ours = frechet_distance(s1["mu"], s1["sigma"], s2["mu"], s2["sigma"])
    assert ours == pytest.approx(theirs, rel=1e-9 if n == 200 else 1e-6)
    ref = Reference(s2["mu"], s2["sigma"], 8, n + 3, "", "test")
    assert ref.fid(s1["mu"], s1["sigma"]) == pytest.approx(
        ours, rel=1e-12
    )  # with the square root made once
    np.testing.assert_allclose(ref.sigma_sqrt @ ref.sigma_sqrt, s2["sigma"], atol=1e-12)


def test_inception_score_closed_form():
    # Uniform predictions carry no information: IS = 1. Confident predictions spread evenly over K
    # classes: IS = K.
    assert inception_score(torch.zeros(40, 1008))[0] == pytest.approx(1.0, abs=1e-9)
    confident = torch.full((40, 1008), -40.0)  # p of the others ~e^-40: IS = 4 to ~1e-12
    confident[torch.arange(40), torch.arange(40) % 4] = 0.0
    mean, _ = inception_score(confident, splits=1)  # one split: the whole set is balanced
    assert mean == pytest.approx(4.0, rel=1e-6)


def test_balanced_labels_are_balanced_seeded_and_shuffled():
    y = balanced_labels(103, 10, seed=3)
    counts = torch.bincount(y, minlength=10)
    assert counts.max() - counts.min() <= 1 and counts.sum() == 103
    assert torch.equal(y, balanced_labels(103, 10, seed=3))
    assert not torch.equal(y, balanced_labels(103, 10, seed=4))
    assert not torch.equal(y, torch.arange(103) % 10)


def test_plan_covers_every_index_once_for_any_world_size():
    for world in (1, 2, 3):
        ranges = [r for rank in range(world) for r in plan_batches(23, 4, rank, world)]
        covered = sorted(i for a, b in ranges for i in range(a, b))
        assert covered == list(range(23))
    assert plan_batches(23, 4, 1, 2) == [(4, 8), (12, 16), (20, 23)]
    with pytest.raises(ValueError, match="batch_size"):
        plan_batches(10, 0)


def test_noise_depends_on_the_sample_index_not_the_batch():
    whole = sample_noise(0, 6, (2, 3, 3), seed=7)
    parts = torch.cat([sample_noise(0, 2, (2, 3, 3), 7), sample_noise(2, 6, (2, 3, 3), 7)])
    assert torch.equal(whole, parts)
    assert not torch.equal(whole, sample_noise(0, 6, (2, 3, 3), seed=8))


def test_to_uint8_maps_the_range_ends_and_rounds():
    x = torch.tensor([-1.5, -1.0, 0.0, 1.0, 2.0, 1 / 127.5 - 1]).view(1, 1, 2, 3).expand(1, 3, 2, 3)
    assert to_uint8(x)[0, 0].flatten().tolist() == [0, 0, 128, 255, 255, 1]


def test_reference_round_trip_and_clear_errors(tmp_path):
    ref = Reference(
        np.arange(3.0),
        np.diag([4.0, 1, 9]),
        image_size=32,
        num_images=10,
        fingerprint="abc",
        source="test",
    )
    ref.fid(np.zeros(3), np.eye(3))  # computes and keeps sigma's square root
    save_reference(tmp_path / "ref.npz", ref)
    back = load_reference(tmp_path / "ref.npz")
    np.testing.assert_array_equal(back.mu, ref.mu)
    np.testing.assert_array_equal(back.sigma, ref.sigma)
    np.testing.assert_allclose(back.sigma_sqrt, np.diag([2.0, 1, 3]), atol=1e-12)
    assert (back.image_size, back.num_images, back.fingerprint, back.features) == (
        32,
        10,
        "abc",
        None,
    )
    check_reference(back, "ref.npz", 32, "abc")
    with pytest.raises(ValueError, match="image_size=64"):
        check_reference(back, "ref.npz", 64, "abc")
    with pytest.raises(ValueError, match="other Inception weights"):
        check_reference(back, "ref.npz", 32, "xyz")
    with pytest.raises(FileNotFoundError, match="data_pipelines.fid_reference"):
        load_reference(tmp_path / "missing.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a readable .npz"):
        load_reference(tmp_path / "junk.npz")
    np.savez(tmp_path / "samples.npz", arr_0=np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="holds no FID statistics"):
        load_reference(tmp_path / "samples.npz")


def test_adm_reference_batch_read_as_is(tmp_path):
    mu, sigma = np.random.rand(2048), np.random.rand(2048, 2048)
    np.savez(
        tmp_path / "VIRTUAL.npz",
        arr_0=np.zeros((5, 16, 16, 3), np.uint8),
        mu=mu,
        sigma=sigma,
        mu_s=mu[:10],
    )
    ref = load_reference(tmp_path / "VIRTUAL.npz")  # accepted directly ...
    np.testing.assert_array_equal(ref.mu, mu)
    np.testing.assert_array_equal(ref.sigma, sigma)
    assert (ref.image_size, ref.num_images, ref.fingerprint) == (16, 5, "")
    check_reference(
        ref, "VIRTUAL.npz", 16, "any weights"
    )  # torch-fidelity's Inception is a port of the ADM one
    with pytest.raises(ValueError, match="pass image_size=16"):
        read_adm_reference(tmp_path / "VIRTUAL.npz", image_size=32)


def test_adm_npz_from_parts_and_resume_guard(tmp_path):
    store = PartStore(tmp_path / "parts", {"seed": 0, "n": 5})
    imgs = np.random.randint(0, 256, (5, 4, 4, 3), dtype=np.uint8)
    labels = np.array([3, 1, 4, 1, 5])
    store.save(
        3, imgs[3:], labels[3:], np.zeros((2, 2048), np.float32), np.zeros((2, 1008), np.float32)
    )
    store.save(
        0, imgs[:3], labels[:3], np.zeros((3, 2048), np.float32), np.zeros((3, 1008), np.float32)
    )
    assert store.load(0, 3)["labels"].tolist() == [3, 1, 4]
    assert store.load(0, 4) is None and store.load(6, 2) is None
    write_adm_npz(tmp_path / "samples.npz", store, [0, 3])
    with np.load(tmp_path / "samples.npz") as z:
        assert z["arr_0"].dtype == np.uint8 and z["arr_0"].shape == (5, 4, 4, 3)
        np.testing.assert_array_equal(z["arr_0"], imgs)
        np.testing.assert_array_equal(z["arr_1"], labels)
    PartStore(tmp_path / "parts", {"seed": 0, "n": 5})  # same settings: resumable
    with pytest.raises(ValueError, match="other settings"):
        PartStore(tmp_path / "parts", {"seed": 1, "n": 5})


def test_image_grid_places_images_row_by_row():
    imgs = torch.stack([torch.full((3, 2, 2), 10 * i, dtype=torch.uint8) for i in range(5)])
    grid = image_grid(imgs)  # 3 per row, 2 rows
    assert grid.shape == (4, 6, 3)
    assert grid[0, 2, 0] == 10 and grid[2, 2, 0] == 40 and grid[3, 5, 0] == 0


class _NoisyObjective:
    """A stand-in objective whose sampler draws from the global RNG, like ancestral DDPM."""

    def sample(self, model, x_T, model_kwargs, **kwargs):
        return x_T + 0.1 * torch.randn_like(x_T)


def test_sampling_leaves_the_training_rng_untouched_and_is_reproducible():
    """The FID callback samples mid-training: the global RNG must be where it was (exact resume), and a batch
    must not depend on it."""
    kwargs = dict(seed=3, start=8, sample_kwargs={}, autocast=contextlib.nullcontext)
    noise, labels = sample_noise(8, 12, (3, 4, 4), seed=3), torch.arange(4)
    torch.manual_seed(123)
    a = generate_batch(None, _NoisyObjective(), lambda z: z, labels, noise, **kwargs)
    after = torch.rand(3)
    torch.manual_seed(999)  # another global state: same images
    b = generate_batch(None, _NoisyObjective(), lambda z: z, labels, noise, **kwargs)
    torch.manual_seed(123)
    assert torch.equal(torch.rand(3), after)
    assert torch.equal(a, b) and a.dtype == torch.uint8
    c = generate_batch(
        None, _NoisyObjective(), lambda z: z, labels, noise, **{**kwargs, "start": 12}
    )
    assert not torch.equal(a, c)  # the sampler's draws depend on the batch's place in the plan
