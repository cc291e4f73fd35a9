"""Images beside the latents (keep_images=true, shard format version 2): stored losslessly, recorded
in the manifest, flipped together with the latent; version-1 shards without images still load, and
asking for images from them fails before training, naming keep_images=true."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import torch

from ditkit.data import LatentShardsDataModule
from ditkit.data.extract import extract_latents, merge_manifest
from ditkit.data.format import IMAGE, MANIFEST, VERSION, DataFormatError, decode_image
from ditkit.data.images import center_crop_arr, open_rgb
from ditkit.data.sources import ImageFolderSource
from ditkit.data.vae import IdentityVAE


@pytest.fixture(scope="module")
def image_shards(tmp_path_factory, blob_images, write_image_folder):
    """12 asymmetric 20 x 14 images -> 8 px identity-VAE shards with images, 2 shards."""
    tmp = tmp_path_factory.mktemp("images")
    images = blob_images(12, size=20, seed=3)[:, :14]  # not square: the crop matters
    folder = write_image_folder(tmp / "src", images, classes=2)
    out = tmp / "shards"
    extract_latents(
        ImageFolderSource(str(folder)),
        IdentityVAE(),
        str(out),
        image_size=8,
        shard_size=6,
        num_workers=0,
        progress=False,
        keep_images=True,
    )
    merge_manifest(str(out))
    return folder, out


def _samples(out):
    for tar_path in sorted(out.glob("train-*.tar")):
        with tarfile.open(tar_path) as tar:
            members = {}
            for m in tar.getmembers():
                key, field = m.name.split(".", 1)
                members.setdefault(key, {})[field] = tar.extractfile(m).read()
            yield from members.items()


def test_images_are_the_exact_crop_the_vae_saw(image_shards):
    folder, out = image_shards
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["version"] == VERSION == 2
    assert manifest["images"] == {"field": IMAGE, "size": 8, "dtype": "uint8", "crop": "adm_center"}
    sources = {p.relative_to(folder).with_suffix("").as_posix(): p for p in folder.rglob("*.png")}
    seen = 0
    for key, sample in _samples(out):
        stored = decode_image(sample, 8)  # (3, 8, 8) uint8
        crop = center_crop_arr(open_rgb(str(next(p for k, p in sources.items() if k in key))), 8)
        np.testing.assert_array_equal(stored, crop.transpose(2, 0, 1))  # PNG: lossless
        # The identity VAE stores the same crop as its pixel-space sample (uint8, exact).
        pixels = np.load(io.BytesIO(sample["pixels.npy"]))
        np.testing.assert_array_equal(pixels, stored)
        seen += 1
    assert seen == 12


def test_batches_carry_the_image_flipped_with_the_latent(image_shards, datamodule_kwargs):
    _, out = image_shards
    stored = {key: torch.from_numpy(decode_image(s, 8)) for key, s in _samples(out)}
    dm = LatentShardsDataModule(
        **datamodule_kwargs(out, shape=(3, 8, 8), num_classes=2, batch_size=4, flip=True),
        images=True,
    )
    dm.setup("fit")
    mirrored = 0
    for _, batch in zip(range(6), dm.train_dataloader()):
        image = batch["image"]
        assert image.dtype == torch.uint8 and image.shape == (4, 3, 8, 8)
        # x is the image's or the mirror's pixels in [-1, 1] (identity VAE: pixel-space storage,
        # p / 127.5 - 1 in float32 on both sides, so exact): the same picture as the image field.
        np.testing.assert_array_equal(batch["x"], image.float() / 127.5 - 1)
        for key, img in zip(batch["key"], image):
            crop = stored[key]
            assert torch.equal(img, crop) or torch.equal(img, crop.flip(-1))
            mirrored += int(not torch.equal(img, crop))
    assert 0 < mirrored < 24  # both the image and its mirror were drawn


def test_shards_without_images_load_and_refuse_encoders(
    tmp_path, write_latent_shards, datamodule_kwargs
):
    write_latent_shards(tmp_path)
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    manifest["version"] = 1  # written before images existed
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    dm = LatentShardsDataModule(**datamodule_kwargs(tmp_path))
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert "image" not in batch and batch["x"].shape == (2, 4, 8, 8)
    with pytest.raises(DataFormatError, match="keep_images=true"):
        LatentShardsDataModule(**datamodule_kwargs(tmp_path), images=True).setup("fit")
