"""Pixel-space shards (extract_latents vae=identity): uint8 crops stored as they are, read back to
exactly the [-1, 1] images (and mirrors) an image pipeline would give, by the training loader, the
FID reference and evaluate.py's identity decoder."""

import io
import json

import numpy as np
import torch
import webdataset as wds
from omegaconf import OmegaConf
from PIL import Image

from data_pipelines.fid_reference import _shard_images
from ditkit.data import LatentShardsDataModule
from ditkit.data.extract import extract_latents, merge_manifest
from ditkit.data.format import MANIFEST, PIXELS
from ditkit.data.images import center_crop_arr, open_rgb, to_tensor
from ditkit.data.sources import ImageFolderSource
from ditkit.data.vae import IdentityVAE, vae_from_manifest


def write_images(root, n=3, seed=0):
    rng = np.random.default_rng(seed)
    (root / "a").mkdir(parents=True)
    paths = []
    for i in range(n):
        path = root / "a" / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, (300, 280 + i, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def test_identity_extraction_at_256_px_stores_uint8_crops(tmp_path):
    paths = write_images(tmp_path / "images")
    out = tmp_path / "out"
    extract_latents(
        ImageFolderSource(str(tmp_path / "images")),
        IdentityVAE(),
        str(out),
        image_size=256,
        num_workers=0,
        progress=False,
    )
    manifest = merge_manifest(str(out))
    assert (manifest["storage"], manifest["dtype"], list(manifest["fields"])) == (
        "pixels",
        "uint8",
        [PIXELS],
    )
    assert manifest["latent_shape"] == [3, 256, 256] and manifest["vae"]["name"] == "identity"
    (tar,) = out.glob("train-*.tar")
    samples = {s["__key__"]: s for s in wds.tariterators.tarfile_samples([{"url": str(tar)}])}
    assert len(samples) == 3
    for path in paths:
        sample = samples[f"a/{path.stem}_png"]  # ImageFolderSource's key
        assert set(sample) - {"__key__", "__url__", "__local_path__"} == {"cls", PIXELS}
        pixels = np.load(io.BytesIO(sample[PIXELS]))
        # 192 KB an image, mirror included (the loader flips); float16 pixels alone take twice that.
        assert pixels.dtype == np.uint8 and pixels.nbytes == 196_608 == 192 * 1024
        crop = center_crop_arr(open_rgb(str(path)), 256)  # (H, W, 3) uint8, the ADM crop
        np.testing.assert_array_equal(pixels, crop.transpose(2, 0, 1))


def test_loader_scales_pixels_to_the_images_and_mirrors(tmp_path):
    paths = write_images(tmp_path / "images", n=4)
    out = tmp_path / "out"
    source = ImageFolderSource(str(tmp_path / "images"))
    extract_latents(source, IdentityVAE(), str(out), image_size=16, num_workers=0, progress=False)
    merge_manifest(str(out))
    expected = {
        f"a/{p.stem}_png": to_tensor(center_crop_arr(open_rgb(str(p)), 16)) for p in paths
    }  # to_tensor: uint8 -> p / 127.5 - 1, what training on images sees
    dm = LatentShardsDataModule(
        root=str(out),
        latent_size=16,
        latent_channels=3,
        num_classes=1,
        image_size=16,
        batch_size=4,
        num_workers=0,
        shuffle_buffer=4,
        return_keys=True,
        flip=True,
    )
    seen = {"image": 0, "mirror": 0}
    for _, batch in zip(range(8), dm.train_dataloader()):
        assert batch["x"].dtype == torch.float32
        assert batch["x"].min() >= -1 and batch["x"].max() <= 1
        for key, x in zip(batch["key"], batch["x"]):
            want = expected[key]
            if torch.equal(x, want):
                seen["image"] += 1
            else:  # bit for bit the mirrored image, no posterior noise
                assert torch.equal(x, want.flip(-1))
                seen["mirror"] += 1
    assert seen["image"] > 0 and seen["mirror"] > 0


def test_fid_reference_and_evaluate_decode_pixel_shards_with_the_identity(tmp_path):
    paths = write_images(tmp_path / "images", n=3)
    out = tmp_path / "out"
    extract_latents(
        ImageFolderSource(str(tmp_path / "images")),
        IdentityVAE(),
        str(out),
        image_size=16,
        num_workers=0,
        progress=False,
    )
    merge_manifest(str(out))
    manifest = json.loads((out / MANIFEST).read_text())
    assert isinstance(vae_from_manifest(manifest), IdentityVAE)  # evaluate.py's decoder
    cfg = OmegaConf.create(
        {"source": {"root": str(out), "vae": None}, "image_size": None, "batch_size": 4}
    )
    cfg.num_workers = 0
    batches, total, size, _ = _shard_images(cfg, torch.device("cpu"))
    decoded = torch.cat(list(batches))
    assert (total, size) == (3, 16) and decoded.dtype == torch.uint8
    crops = sorted(center_crop_arr(open_rgb(str(p)), 16).tobytes() for p in paths)
    got = sorted(d.permute(1, 2, 0).contiguous().numpy().tobytes() for d in decoded)
    assert got == crops  # the reference sees the uint8 crops themselves
