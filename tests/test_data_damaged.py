"""Bad data never crashes a run: setup refuses what cannot work, naming it; damaged samples are
skipped and counted."""

import json
import logging
import os

import numpy as np
import pytest
import webdataset as wds

from ditkit.data import DataFormatError, LatentShardsDataModule
from ditkit.data.format import encode_sample, shard_name


@pytest.fixture
def make(datamodule_kwargs):
    def make(root, **overrides):
        return LatentShardsDataModule(**datamodule_kwargs(root, **overrides))

    return make


@pytest.fixture
def shards(tmp_path, write_latent_shards):
    root = tmp_path / "shards"
    write_latent_shards(root, (4, 4, 4))
    return root


def edit_manifest(root, **changes):
    manifest = json.loads((root / "manifest.json").read_text())
    manifest.update(changes)
    (root / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    "damage, error, message",
    [
        (
            lambda r: os.rename(r, str(r) + "_gone"),
            FileNotFoundError,
            r"data.root=.*shards does not exist",
        ),
        (
            lambda r: os.remove(r / "manifest.json"),
            FileNotFoundError,
            r"shards/manifest.json is missing",
        ),
        (
            lambda r: (r / "manifest.json").write_text("{oops"),
            DataFormatError,
            r"shards/manifest.json is not valid JSON",
        ),
        (
            lambda r: (r / "manifest.json").write_text("[]"),
            DataFormatError,
            r"manifest.json is not a ditkit-latent",
        ),
        (
            lambda r: os.remove(r / shard_name(1)),
            FileNotFoundError,
            r"1 of 3 shards are missing.*train-000001.tar",
        ),
        (
            lambda r: edit_manifest(r, latent_shape=[4, 16, 16]),
            DataFormatError,
            r"(?s)latents \[4, 16, 16\].*data.latent_size=8, but the shards have 16: pass "
            r"data.latent_size=16",
        ),
        (
            lambda r: edit_manifest(r, num_classes=1000),
            DataFormatError,
            r"data.num_classes=10, but the shards have 1000: pass data.num_classes=1000",
        ),
        (
            lambda r: edit_manifest(r, image_size=256),
            DataFormatError,
            r"data.image_size=8, but the shards have 256: pass data.image_size=256",
        ),
    ],
    ids=[
        "no-root",
        "no-manifest",
        "bad-json",
        "not-a-manifest",
        "missing-shard",
        "latent-shape",
        "classes",
        "image-size",
    ],
)
def test_setup_refuses_unusable_data_naming_the_fix(shards, make, damage, error, message):
    damage(shards)
    with pytest.raises(error, match=message):
        make(shards).setup()


def test_shards_whose_latents_do_not_match_the_manifest_are_refused_at_setup(
    tmp_path, make, write_latent_shards
):
    write_latent_shards(tmp_path, (3,), shape=(4, 4, 4))
    edit_manifest(tmp_path, latent_shape=[4, 8, 8], image_size=8)
    with pytest.raises(
        DataFormatError,
        match=r"train-000000.tar: moments.npy has shape \[8, 4, 4\], expected \[8, 8, 8\]",
    ):
        make(tmp_path).setup()


def test_bad_arguments_fail_at_construction(shards, make):
    with pytest.raises(ValueError, match="exactly one of data.root"):
        LatentShardsDataModule(8, 4, 10, 8)
    with pytest.raises(ValueError, match="data.batch_size=0"):
        make(shards, batch_size=0)
    with pytest.raises(ValueError, match="data.builtin='mnist'"):
        make(shards, builtin="mnist")


@pytest.fixture
def write_damaged(write_latent_shards, synthetic_moments):
    def write_damaged(root):
        """4 shards of 5 samples (keys k0000..k0019) with: k0002 a corrupt .npy, k0006 no cls,
        k0011 a wrong latent shape, and shard 3 cut in the middle of k0017's moments. Returns the
        keys that are intact."""
        root.mkdir()
        write_latent_shards(root, (5, 5, 5, 5))  # the manifest; shards are rewritten below
        for s in range(4):
            with wds.TarWriter(str(root / shard_name(s)), encoder=False) as tar:
                for i in range(5 * s, 5 * s + 5):
                    sample = encode_sample(f"k{i:04d}", i % 10, *synthetic_moments(i))
                    if i == 2:
                        sample["moments.npy"] = b"\x93NUMPY garbage"
                    if i == 6:
                        del sample["cls"]
                    if i == 11:
                        sample = encode_sample(
                            f"k{i:04d}", 1, *synthetic_moments(i, shape=(4, 4, 4))
                        )
                    tar.write(sample)
        data = (root / shard_name(3)).read_bytes()
        # header block, then 1000 bytes into the member
        cut = data.index(b"k0017.moments.npy") + 512 + 1000
        (root / shard_name(3)).write_bytes(data[:cut])
        return [f"k{i:04d}" for i in range(17) if i not in (2, 6, 11)]

    return write_damaged


@pytest.mark.parametrize("workers", [0, 2])
def test_damaged_samples_and_a_truncated_shard_are_skipped_and_counted(
    tmp_path, workers, caplog, make, write_damaged
):
    intact = write_damaged(tmp_path / "damaged")
    # No flips: every read decodes moments.npy (k0002's mirror moments are intact, and a flipped
    # read of it would be used).
    dm = make(tmp_path / "damaged", num_workers=workers, flip=False)
    loader = dm.train_dataloader()
    with caplog.at_level(logging.WARNING, logger="ditkit.data.stream"):
        seen = {k for _ in range(4) for batch in loader for k in batch["key"]}
    # 4 epochs of shard draws with replacement read every shard: every intact sample, no other.
    assert sorted(seen) == intact
    # Each read of shards 0-2 skips one sample (k0002, k0006, k0011); each of the cut shard 3, two
    # (the tar error, then k0017's member-less remains): at least one of each kind was counted.
    assert dm.skipped >= 5
    if workers == 0:
        messages = "\n".join(r.getMessage() for r in caplog.records)
        assert (
            "k0002: moments.npy is not a readable .npy" in messages and "k0006: no cls" in messages
        )
        assert "k0011: moments.npy has shape [8, 4, 4], expected [8, 8, 8]" in messages
        assert "train-000003.tar" in messages


def test_training_goes_on_through_damage_and_a_shard_lost_mid_run(tmp_path, make, write_damaged):
    write_damaged(tmp_path / "damaged")
    dm = make(tmp_path / "damaged", num_workers=2)
    loader = dm.train_dataloader()
    os.remove(tmp_path / "damaged" / shard_name(2))  # vanishes after the start checks
    batches = list(loader) + list(loader)
    assert len(batches) == 2 * 10  # every epoch has its batches, however many reads were bad
    assert all(np.isfinite(b["x"].numpy()).all() for b in batches)
    assert dm.skipped > 0


def test_npy_fast_path_still_refuses_a_cut_array_with_a_known_header():
    from ditkit.data.format import decode_moments, npy_bytes

    good = npy_bytes(np.arange(8 * 4 * 4, dtype=np.float16).reshape(8, 4, 4))
    for _ in range(2):  # the second read takes the cached-header path
        assert (
            decode_moments({"moments.npy": good}, "moments.npy", (8, 4, 4))[2, 1, 3]
            == 2 * 16 + 4 + 3
        )
    with pytest.raises(DataFormatError, match="moments.npy is not a readable .npy"):
        decode_moments({"moments.npy": good[:-2]}, "moments.npy", (8, 4, 4))
    fortran = np.asfortranarray(np.arange(6, dtype=np.float16).reshape(2, 3))
    for _ in range(2):
        np.testing.assert_array_equal(
            decode_moments({"f": npy_bytes(fortran)}, "f", (2, 3)), fortran
        )


class _Recorder:
    """Stand-ins for the trainer and module DataHealth reads: one process, a data module whose
    counts the test sets."""

    def __init__(self, skipped, read, limit=0.01, log_step=True):
        from types import SimpleNamespace

        self.logged = {}
        dm = SimpleNamespace(skipped=skipped, samples_read=read, max_skipped_fraction=limit)
        self.trainer = SimpleNamespace(
            datamodule=dm,
            _logger_connector=SimpleNamespace(should_update_logs=log_step),
            strategy=SimpleNamespace(reduce=lambda t, reduce_op: t),
        )
        self.device = "cpu"

    def log(self, name, value, **kwargs):
        self.logged[name] = value


def test_data_health_logs_the_count_and_stops_above_the_fraction():
    from ditkit.training import DamagedDataError, DataHealth
    from ditkit.training.data_health import MIN_SKIPPED

    health = DataHealth()
    ok = _Recorder(skipped=10, read=990)  # exactly 1%: not above the limit
    health.on_train_batch_end(ok.trainer, ok, None, None, 0)
    assert ok.logged == {"data/skipped": 10.0}
    quiet = _Recorder(skipped=7, read=0, log_step=False)  # not a logging step: nothing read
    health.on_train_batch_end(quiet.trainer, quiet, None, None, 0)
    assert quiet.logged == {}
    few = _Recorder(skipped=MIN_SKIPPED - 1, read=0)  # 100% damaged, but too few to judge
    health.on_train_batch_end(few.trainer, few, None, None, 0)
    assert few.logged == {"data/skipped": float(MIN_SKIPPED - 1)}
    bad = _Recorder(skipped=11, read=989)  # 1.1% of 1000
    with pytest.raises(DamagedDataError, match=r"11 damaged .* 989 read intact \(1.1% .*=0.01\)"):
        health.on_train_batch_end(bad.trainer, bad, None, None, 0)
    loose = _Recorder(skipped=11, read=989, limit=0.2)
    health.on_train_batch_end(loose.trainer, loose, None, None, 0)


def test_max_skipped_fraction_is_checked_at_construction(shards, make):
    with pytest.raises(ValueError, match=r"data.max_skipped_fraction=1.5 must lie in \[0, 1\]"):
        make(shards, max_skipped_fraction=1.5)


def _fit_on_damaged(root, make, tiny_dit, tmp_path, limit, steps):
    import csv

    import lightning as L
    from lightning.pytorch.loggers import CSVLogger

    from ditkit.objectives import RectifiedFlow
    from ditkit.training import DataHealth, DiffusionModule

    dm = make(root, num_workers=0, flip=False, max_skipped_fraction=limit)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        log_every_n_steps=1,
        logger=CSVLogger(tmp_path, name="csv"),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=[DataHealth()],
    )
    error = None
    try:
        trainer.fit(DiffusionModule(tiny_dit(), RectifiedFlow()), datamodule=dm)
    except Exception as e:  # noqa: BLE001 - returned for the test to check
        error = e
    trainer.logger.finalize("success")
    rows = []
    for path in tmp_path.glob("csv/version_*/metrics.csv"):
        with open(path) as f:
            rows += [r for r in csv.DictReader(f) if r.get("data/skipped")]
    return dm, [float(r["data/skipped"]) for r in rows], error


def test_damaged_stream_is_logged_and_a_run_over_the_limit_stops(
    tmp_path, make, write_damaged, tiny_dit, caplog
):
    """The damaged shards of write_damaged (4 of 20 samples bad, one shard cut) are about 20% of
    the stream: with the limit at 100% the run trains to the end and logs data/skipped every step,
    rising to at least MIN_SKIPPED; with 5% it stops with DamagedDataError."""
    from ditkit.training import DamagedDataError

    write_damaged(tmp_path / "damaged")
    root = tmp_path / "damaged"
    with caplog.at_level(logging.INFO):
        dm, logged, error = _fit_on_damaged(root, make, tiny_dit, tmp_path / "a", 1.0, steps=30)
    assert error is None
    assert len(logged) == 30 and logged == sorted(logged) and 10 <= logged[-1] <= dm.skipped
    assert f"ditkit: {dm.skipped} damaged samples or shards skipped" in caplog.text
    _, logged, error = _fit_on_damaged(root, make, tiny_dit, tmp_path / "b", 0.05, steps=30)
    assert isinstance(error, DamagedDataError), error
    assert "data.max_skipped_fraction=0.05" in str(error)
