"""FID through torch-fidelity's Inception (stand-in random weights: the machinery, not absolute numbers).

Images are 32 px blobs, 8 per set; Inception resizes to 299 px itself, which is what costs time on CPU.
"""

import numpy as np
import pytest
import torch

from ditkit.evaluation import (
    FeatureStats,
    inception_features,
    inception_fingerprint,
    load_inception,
    load_reference,
)

N, SIZE = 8, 32


@pytest.fixture(scope="module")
def extractor(inception_weights):
    return load_inception(str(inception_weights))


@pytest.fixture(scope="module")
def folder_a(tmp_path_factory, blob_images, write_image_folder):
    """The 'real' set as an ImageNet-layout folder of PNGs (two class folders)."""
    return write_image_folder(
        tmp_path_factory.mktemp("set_a"), blob_images(N, SIZE, seed=0), classes=2
    )


@pytest.fixture(scope="module")
def reference_a(folder_a, inception_weights, tmp_path_factory, make_reference):
    """fid_reference run on folder A through its Hydra config (features kept for KID /
    precision-recall)."""
    out = tmp_path_factory.mktemp("ref") / "ref_a.npz"
    return make_reference(folder_a, out, inception_weights, SIZE, f"features={N}")


@pytest.fixture(scope="module")
def clean(extractor, blob_images):
    """Pool features and logits of set A computed in memory (not through the PNG folder)."""
    return _features(extractor, blob_images(N, SIZE, seed=0))


def _features(extractor, images: np.ndarray):
    """(n, H, W, 3) uint8 -> pool (n, 2048), logits (n, 1008)."""
    return inception_features(extractor, torch.from_numpy(images).permute(0, 3, 1, 2).contiguous())


def _stats(pool):
    s = FeatureStats()
    s.update(pool)
    return s.mean_cov()


def test_standin_weights_give_informative_features(clean):
    pool, logits = clean
    assert pool.shape == (N, 2048) and logits.shape == (N, 1008)
    # The default init would give features of std ~1e-8 and every FID ~0; the stand-in must not.
    assert pool.std(0).mean() > 1e-3


def test_reference_file_records_how_it_was_made(reference_a, extractor):
    ref = load_reference(reference_a)
    assert (ref.image_size, ref.num_images) == (SIZE, N)
    assert ref.fingerprint == inception_fingerprint(extractor)
    assert ref.features.shape == (N, 2048)
    np.testing.assert_allclose(ref.features.mean(0), ref.mu, rtol=1e-5, atol=1e-7)


def test_fid_of_a_set_against_its_own_statistics_is_zero(reference_a, clean):
    ref = load_reference(reference_a)
    mu, sigma = _stats(clean[0])
    fid = ref.fid(mu, sigma)
    # Not exactly 0: the ~2040 zero eigenvalues of a rank-7 covariance carry float noise, and FID sums
    # their roots.
    assert abs(fid) < 1e-5 * np.trace(sigma)


def test_fid_grows_monotonically_with_distortion(reference_a, extractor, clean, blob_images):
    ref = load_reference(reference_a)
    images = blob_images(N, SIZE, seed=0).astype(np.float64)
    noise = np.random.default_rng(1).standard_normal(images.shape)
    fids = [ref.fid(*_stats(clean[0]))]
    for level in (12, 48):  # additive Gaussian noise of this std, in 8-bit levels
        distorted = (images + level * noise).round().clip(0, 255).astype(np.uint8)
        fids.append(ref.fid(*_stats(_features(extractor, distorted)[0])))
    assert abs(fids[0]) < 1e-3 < fids[1] < fids[2], fids
