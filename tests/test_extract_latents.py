"""images -> VAE moments -> shards: crop, colour modes, bad files, the VAE's moments, resume, ranks,
manifest."""

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from hydra import compose, initialize_config_dir
from PIL import Image
from sklearn.datasets import load_digits

from data_pipelines.extract_latents import run
from ditkit.data.extract import extract_latents, merge_manifest
from ditkit.data.format import MANIFEST, DataFormatError, decode_label, shard_name
from ditkit.data.images import center_crop_arr, open_rgb, to_tensor
from ditkit.data.sources import DigitsSource, ImageFolderSource, WebDatasetSource
from ditkit.data.vae import IdentityVAE, load_vae

CONF = str(Path(__file__).resolve().parents[1] / "conf")


def read_shards(out: Path) -> dict[str, dict]:
    """key -> {"label", "shard", and "moments", "moments_flip" or (pixel sets) "pixels"} for every
    sample of every train-*.tar."""
    samples = {}
    for tar in sorted(out.glob("train-*.tar")):
        for s in wds.tariterators.tarfile_samples([{"url": str(tar)}]):
            fields = ("pixels.npy",) if "pixels.npy" in s else ("moments.npy", "moments_flip.npy")
            samples[s["__key__"]] = {
                "label": decode_label(s),
                "shard": tar.name,
                **{f[:-4]: np.load(io.BytesIO(s[f])) for f in fields},
            }
    return samples


def test_center_crop_matches_the_adm_recipe_on_known_sizes():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (300, 512, 3), dtype=np.uint8))  # W=512, H=300
    # 300 >= 2*128: one box halving to 256x150; then bicubic to round(256*128/150)=218 x 128; crop x from 45.
    expected = np.asarray(image.resize((256, 150), Image.BOX).resize((218, 128), Image.BICUBIC))[
        :, 45:173
    ]
    np.testing.assert_array_equal(center_crop_arr(image, 128), expected)
    # A tiny image is upscaled: 5x3 -> bicubic to 27x16 (round(5*16/3)) -> crop x from 5.
    tiny = Image.fromarray(rng.integers(0, 256, (3, 5, 3), dtype=np.uint8))
    np.testing.assert_array_equal(
        center_crop_arr(tiny, 16), np.asarray(tiny.resize((27, 16), Image.BICUBIC))[:, 5:21]
    )
    assert (
        to_tensor(np.full((2, 2, 3), 255, np.uint8)).eq(1).all()
        and to_tensor(np.zeros((2, 2, 3), np.uint8)).eq(-1).all()
    )


def _solid(mode, value, size=(10, 12)):
    return Image.new(mode, size, value)


@pytest.mark.parametrize(
    "make, rgb",
    [
        (
            lambda p: _solid("CMYK", (0, 255, 255, 0)).save(p / "x.jpg", quality=100),
            (255, 0, 0),
        ),  # cyan 0: red
        (lambda p: _solid("L", 100).save(p / "x.png"), (100, 100, 100)),
        (
            lambda p: _solid("RGBA", (255, 0, 0, 0)).save(p / "x.png"),
            (255, 255, 255),
        ),  # transparent -> white
        (lambda p: _solid("LA", (0, 255)).save(p / "x.png"), (0, 0, 0)),  # opaque black stays black
        (
            lambda p: Image.fromarray(np.full((9, 9), 65535, np.uint16)).save(p / "x.png"),
            (255, 255, 255),
        ),
        (
            lambda p: (
                _solid("RGB", (10, 200, 30)).convert("P", palette=Image.ADAPTIVE).save(p / "x.png")
            ),
            (10, 200, 30),
        ),
        (
            lambda p: (
                _solid("RGB", (10, 200, 30))
                .convert("P", palette=Image.ADAPTIVE)
                .save(p / "x.png", transparency=0)
            ),
            (255, 255, 255),
        ),
    ],
    ids=["cmyk", "gray", "rgba-transparent", "la", "gray16", "palette", "palette-transparent"],
)
def test_colour_modes_become_the_expected_rgb(tmp_path, make, rgb):
    make(tmp_path)
    array = center_crop_arr(open_rgb(next(tmp_path.iterdir())), 8)
    assert array.shape == (8, 8, 3)
    np.testing.assert_allclose(array.reshape(-1, 3).mean(0), rgb, atol=1.5)


@pytest.fixture(scope="module")
def tiny_vae_dir(tmp_path_factory, tiny_autoencoder):
    path = tmp_path_factory.mktemp("vae") / "tiny-vae"
    tiny_autoencoder().save_pretrained(path)
    return path


def _extract(folder, out, vae_dir, *extra):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(
            "extract_latents",
            overrides=[
                "source=imagefolder",
                f"source.root={folder}",
                f"vae.pretrained={vae_dir}",
                f"out={out}",
                "image_size=32",
                "shard_size=3",
                "batch_size=2",
                "num_workers=2",
                "progress=false",
                *extra,
            ],
        )
    return run(cfg)


@pytest.fixture(scope="module")
def extracted(tmp_path_factory, tiny_vae_dir, make_image_folder):
    root = tmp_path_factory.mktemp("extract")
    folder, out = root / "images", root / "latents"
    files = make_image_folder(folder)
    summary = _extract(folder, out, tiny_vae_dir)
    return folder, out, files, summary


def test_extraction_counts_skips_and_records(extracted, tiny_vae_dir):
    folder, out, files, summary = extracted
    manifest = json.loads((out / MANIFEST).read_text())
    n_good, n_all = len(files["good"]), len(files["good"]) + len(files["bad"])
    assert summary["samples"] == manifest["num_samples"] == n_good == 8
    assert summary["skipped"] == manifest["num_skipped"] == len(files["bad"]) == 4
    assert (
        manifest["num_shards"] == -(-n_all // 3) == 4
    )  # 12 files in shards of 3 (bad ones leave gaps)
    assert sum(s["num_samples"] for s in manifest["shards"]) == n_good
    assert (
        manifest["latent_shape"] == [4, 4, 4]
        and manifest["image_size"] == 32
        and manifest["num_classes"] == 2
    )
    assert manifest["vae"] == {
        "name": str(tiny_vae_dir),
        "scale_factor": 0.18215,
        "latent_channels": 4,
        "downsample": 8,
    }
    assert manifest["classes"] == ["cat", "dog"]
    skipped = [line.split("\t")[0] for line in (out / "skipped.txt").read_text().splitlines()]
    assert sorted(skipped) == sorted(f.replace(".", "_") for f in files["bad"])
    samples = read_shards(out)
    assert sorted(samples) == sorted(f.replace(".", "_") for f in files["good"])
    for rel in files["good"]:
        assert samples[rel.replace(".", "_")]["label"] == ("cat", "dog").index(rel.split("/")[0])


def test_stored_moments_are_the_vae_posterior_of_the_crop_and_its_mirror(
    extracted, tiny_autoencoder
):
    folder, out, files, _ = extracted
    samples = read_shards(out)
    crops = [center_crop_arr(open_rgb(folder / rel), 32) for rel in files["good"]]
    x = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        posterior = tiny_autoencoder().encode(torch.cat([x, x.flip(-1)])).latent_dist
    expected = torch.cat([posterior.mean, posterior.logvar], 1).numpy()
    n = len(crops)
    for i, rel in enumerate(files["good"]):
        for field, want in (("moments", expected[i]), ("moments_flip", expected[n + i])):
            stored = samples[rel.replace(".", "_")][field]
            assert stored.dtype == np.float16 and stored.shape == (8, 4, 4)
            np.testing.assert_allclose(stored.astype(np.float32), want, rtol=2e-3, atol=2e-3)


def test_rerun_rewrites_only_the_deleted_shard(extracted, tiny_vae_dir):
    folder, out, _, _ = extracted
    before = {
        p.name: (p.stat().st_ino, p.stat().st_mtime_ns, p.read_bytes())
        for p in out.glob("train-*.tar")
    }
    manifest = (out / MANIFEST).read_text()
    (out / shard_name(2)).unlink()
    (out / f"{shard_name(1)}.tmp-999").write_bytes(
        b"left over by a crash"
    )  # ignored, never a shard
    summary = _extract(folder, out, tiny_vae_dir)
    assert summary["shards"] == 1
    after = {
        p.name: (p.stat().st_ino, p.stat().st_mtime_ns, p.read_bytes())
        for p in out.glob("train-*.tar")
    }
    assert after.keys() == before.keys()
    for name in before:
        if name == shard_name(2):
            assert after[name][2] == before[name][2]  # rewritten, byte for byte the same data
        else:
            assert after[name] == before[name]  # untouched
    assert (out / MANIFEST).read_text() == manifest


def test_a_different_extraction_into_the_same_folder_is_refused(extracted, tiny_vae_dir):
    folder, out, _, _ = extracted
    with pytest.raises(DataFormatError, match="image_size"):
        extract_latents(
            ImageFolderSource(str(folder)),
            load_vae(str(tiny_vae_dir)),
            str(out),
            image_size=64,
            shard_size=3,
            num_workers=0,
            progress=False,
        )


def test_ranks_write_disjoint_shards_and_the_last_merges(tmp_path):
    source, vae = DigitsSource(), IdentityVAE()
    single, split = tmp_path / "single", tmp_path / "split"
    extract_latents(
        source, vae, str(single), image_size=8, shard_size=500, num_workers=0, progress=False
    )
    merge_manifest(str(single))
    counts = extract_latents(
        source,
        vae,
        str(split),
        image_size=8,
        shard_size=500,
        rank=1,
        world_size=2,
        num_workers=0,
        progress=False,
    )
    assert counts == {"shards": 2, "samples": 500 + 297, "skipped": 0}  # shards 1 and 3 of 4
    assert (
        merge_manifest(str(split)) is None and not (split / MANIFEST).exists()
    )  # rank 0 not done yet
    extract_latents(
        source,
        vae,
        str(split),
        image_size=8,
        shard_size=500,
        rank=0,
        world_size=2,
        num_workers=0,
        progress=False,
    )
    assert merge_manifest(str(split))["num_samples"] == 1797
    assert (split / MANIFEST).read_text() == (single / MANIFEST).read_text()
    for i in range(4):
        assert (split / shard_name(i)).read_bytes() == (single / shard_name(i)).read_bytes()
    # The identity VAE stores the image itself as uint8: digit 0 is sklearn's first image (0..16).
    first = read_shards(single)["digits_0000"]
    raw = load_digits().images[0]
    assert first["pixels"].dtype == np.uint8 and first["pixels"].shape == (3, 8, 8)
    np.testing.assert_array_equal(first["pixels"][0], np.round(raw * 255 / 16).astype(np.uint8))


def test_wds_source_keeps_its_shards_and_skips_bad_members(tmp_path):
    rng = np.random.default_rng(0)
    src = tmp_path / "src"
    src.mkdir()
    for s in range(2):
        with wds.TarWriter(str(src / f"in-{s}.tar")) as tar:
            for i in range(3):
                image = Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8))
                tar.write({"__key__": f"s{s}_{i}", "png": image, "cls": 3 * s + i})
            tar.write({"__key__": f"s{s}_nocls", "png": image})
            tar.write({"__key__": f"s{s}_broken", "jpg": b"not a jpeg", "cls": 1})
    out = tmp_path / "out"
    source = WebDatasetSource(str(src / "in-{0..1}.tar"))
    counts = extract_latents(
        source, IdentityVAE(), str(out), image_size=16, num_workers=2, progress=False
    )
    manifest = merge_manifest(str(out))
    assert counts == {"shards": 2, "samples": 6, "skipped": 4}
    assert [s["num_samples"] for s in manifest["shards"]] == [3, 3] and manifest["num_classes"] == 6
    samples = read_shards(out)
    assert {k: v["label"] for k, v in samples.items()} == {
        f"s{s}_{i}": 3 * s + i for s in range(2) for i in range(3)
    }
    assert all(v["shard"] == shard_name(int(k[1])) for k, v in samples.items())


def test_bf16_encoder_is_close_to_fp32_and_bad_settings_fail_early(tmp_path, tiny_vae_dir):
    folder = tmp_path / "images"
    (folder / "a").mkdir(parents=True)
    for i in range(2):
        Image.fromarray(
            np.random.default_rng(i).integers(0, 256, (40, 40, 3), dtype=np.uint8)
        ).save(folder / f"a/{i}.png")
    source, vae = ImageFolderSource(str(folder)), load_vae(str(tiny_vae_dir))
    for precision in ("fp32", "bf16"):
        extract_latents(
            source,
            vae,
            str(tmp_path / precision),
            image_size=32,
            precision=precision,
            num_workers=0,
            progress=False,
        )
    fp32, bf16 = read_shards(tmp_path / "fp32"), read_shards(tmp_path / "bf16")
    for key in fp32:
        np.testing.assert_allclose(
            bf16[key]["moments"].astype(np.float32),
            fp32[key]["moments"].astype(np.float32),
            atol=0.05,
        )
    with pytest.raises(ValueError, match="precision='fp8'"):
        extract_latents(
            source, vae, str(tmp_path / "x"), image_size=32, precision="fp8", progress=False
        )
    with pytest.raises(
        ValueError, match="image_size=36 is not a multiple of the VAE downsampling 8"
    ):
        extract_latents(source, vae, str(tmp_path / "x"), image_size=36, progress=False)
