"""Crash-safe checkpoints (RELIABILITY rows 1-3): a failed or interrupted save never touches the previous
checkpoint, auto-resume ignores temp files and falls back past a truncated or bit-flipped newest file."""

import errno
import os
import shutil
import time

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from ditkit.checkpoints import (
    AtomicModelCheckpoint,
    CheckpointSaveError,
    atomic,
    checkpoint_step,
    find_resume_checkpoint,
)
from ditkit.objectives import GaussianDiffusion
from ditkit.training import DiffusionModule
from ditkit.training.checks import ConfigError, check_resume

# One intra-op thread for every test here (the shared `one_thread` fixture).
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def run(tiny_dit, tiny_batches):
    """run(tmp_path, steps, savers, ckpt_path=None) -> Trainer: the tiny DiT fitted on 64 samples
    with the checkpoint callbacks `savers`."""

    def fit(*args, **kwargs):  # a fresh model and data at every call
        return _run(tiny_dit(0), tiny_batches(64, 0), *args, **kwargs)

    return fit


def _run(model, data, tmp_path, steps, savers, ckpt_path=None):
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=savers,
        default_root_dir=tmp_path,
    )
    trainer.fit(
        DiffusionModule(model, GaussianDiffusion()),
        DataLoader(data, batch_size=4),
        ckpt_path=ckpt_path,
        weights_only=True,
    )
    return trainer


def last_saver(folder, every=2):
    return AtomicModelCheckpoint(
        dirpath=folder,
        every_n_train_steps=every,
        save_top_k=0,
        save_last=True,
        enable_version_counter=False,
    )


def test_crash_mid_save_leaves_the_previous_checkpoint_byte_identical(tmp_path, monkeypatch, run):
    folder = tmp_path / "ckpt"
    run(tmp_path, 2, [last_saver(folder)])
    before = (folder / "last.ckpt").read_bytes()
    assert checkpoint_step(folder / "last.ckpt") == 2

    def crash(src, dst):
        raise OSError("simulated kill during rename")

    monkeypatch.setattr(atomic.os, "replace", crash)
    with pytest.raises(CheckpointSaveError, match=r"last.ckpt.*previous checkpoint is intact"):
        run(tmp_path, 4, [last_saver(folder)], ckpt_path=folder / "last.ckpt")
    monkeypatch.undo()
    assert (folder / "last.ckpt").read_bytes() == before
    assert sorted(p.name for p in folder.iterdir()) == [
        "last.ckpt"
    ]  # the partial temp file was removed

    # A kill leaves a temp file behind (here: newer, and claiming a later step): auto-resume ignores it.
    shutil.copy(folder / "last.ckpt", atomic.temporary_name(folder / "last.ckpt"))
    assert find_resume_checkpoint(folder) == folder / "last.ckpt"


def test_resume_falls_back_past_a_truncated_or_bit_flipped_newest_checkpoint(tmp_path, run):
    folder = tmp_path / "ckpt"
    archive = AtomicModelCheckpoint(
        dirpath=folder,
        filename="step={step}",
        auto_insert_metric_name=False,
        every_n_train_steps=2,
        save_top_k=-1,
    )
    run(tmp_path, 6, [archive])
    names = ["step=2.ckpt", "step=4.ckpt", "step=6.ckpt"]
    assert sorted(p.name for p in folder.iterdir()) == names
    for i, name in enumerate(names):  # make the modification times unambiguous
        os.utime(folder / name, (time.time() - 100 + i, time.time() - 100 + i))
    assert find_resume_checkpoint(folder) == folder / "step=6.ckpt"

    newest = folder / "step=6.ckpt"
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])  # truncated, e.g. by a full disk outside ditkit
    os.utime(newest, (time.time(), time.time()))
    with pytest.warns(
        UserWarning, match=r"auto-resume skips checkpoint .*step=6.ckpt cannot be read"
    ):
        assert find_resume_checkpoint(folder) == folder / "step=4.ckpt"
    with pytest.raises(ConfigError, match=r"step=6.ckpt cannot be read"):
        check_resume("auto", str(newest), folder)

    middle = folder / "step=4.ckpt"
    flipped = bytearray(middle.read_bytes())
    flipped[len(flipped) // 2] ^= (
        0x10  # one bit inside the tensor data: torch.load alone would not notice
    )
    middle.write_bytes(bytes(flipped))
    with pytest.warns(UserWarning, match=r"step=4.ckpt cannot be read .*CRC-32"):
        assert find_resume_checkpoint(folder) == folder / "step=2.ckpt"


def test_disk_full_surfaces_and_retention_keeps_the_last_good_checkpoint(
    tmp_path, monkeypatch, run
):
    folder = tmp_path / "ckpt"
    keep_one = AtomicModelCheckpoint(
        dirpath=folder,
        filename="step={step}",
        auto_insert_metric_name=False,
        every_n_train_steps=2,
        save_top_k=1,
        monitor="step",
        mode="max",
    )
    run(tmp_path, 2, [keep_one])
    good = (folder / "step=2.ckpt").read_bytes()

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    keep_one = AtomicModelCheckpoint(
        dirpath=folder,
        filename="step={step}",
        auto_insert_metric_name=False,
        every_n_train_steps=2,
        save_top_k=1,
        monitor="step",
        mode="max",
    )
    with pytest.raises(CheckpointSaveError, match=r"No space left on device.*free disk space"):
        run(tmp_path, 4, [keep_one], ckpt_path=folder / "step=2.ckpt")
    monkeypatch.undo()
    assert sorted(p.name for p in folder.iterdir()) == [
        "step=2.ckpt"
    ]  # not deleted by top-1 retention
    assert (folder / "step=2.ckpt").read_bytes() == good


def test_resume_never_refuses_to_overwrite_and_missing_ckpt_path_is_named(tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    check_resume("never", None, folder)  # empty: fine
    (folder / "last.ckpt").write_bytes(b"x")
    with pytest.raises(ConfigError, match="resume=never, but .* already holds checkpoints"):
        check_resume("never", None, folder)
    with pytest.raises(ConfigError, match="ckpt_path=.*nope.ckpt does not exist"):
        check_resume("auto", str(tmp_path / "nope.ckpt"), folder)
    with pytest.raises(ConfigError, match="resume='sometimes'"):
        check_resume("sometimes", None, folder)
