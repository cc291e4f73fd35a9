"""Asynchronous checkpoints (issue 14 item 3): the background write holds the state of the step it
was taken at, bit for bit, while training goes on; a failed background write stops the run at the
next save and retention keeps the last good file; sharded saves refuse async_save at start."""

import errno
import threading
import time

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from ditkit.checkpoints import AtomicModelCheckpoint, CheckpointSaveError, saving
from ditkit.checkpoints.background import host_copy
from ditkit.objectives import GaussianDiffusion
from ditkit.training import DiffusionModule


def savers(folder, async_save, top_k=-1):
    return [
        AtomicModelCheckpoint(
            dirpath=folder,
            filename="{step}",
            every_n_train_steps=2,
            save_top_k=top_k,
            save_last=True,
            enable_version_counter=False,
            async_save=async_save,
        )
    ]


def fit(tiny_dit, tiny_batches, tmp_path, callbacks, steps=6):
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        default_root_dir=tmp_path,
    )
    trainer.fit(
        DiffusionModule(tiny_dit(0), GaussianDiffusion()), DataLoader(tiny_batches(64, 0), 4)
    )
    return trainer


def assert_same_file(a, b):
    ca, cb = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    assert ca["global_step"] == cb["global_step"]
    for key, value in ca["state_dict"].items():
        assert torch.equal(value, cb["state_dict"][key]), key
    sa, sb = ca["optimizer_states"][0]["state"], cb["optimizer_states"][0]["state"]
    for i in sa:
        for moment in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(sa[i][moment], sb[i][moment]), (i, moment)


def test_host_copy_is_a_snapshot():
    weights = torch.arange(4.0)
    snap = host_copy({"a": [weights, (weights, 3)], "b": "x"})
    weights.add_(1)
    assert snap["a"][0].tolist() == [0, 1, 2, 3] and snap["a"][1][0].tolist() == [0, 1, 2, 3]
    assert snap["a"][1][1] == 3 and snap["b"] == "x"


def test_background_writes_hold_the_state_of_their_step(
    tmp_path, tiny_dit, tiny_batches, monkeypatch
):
    fit(tiny_dit, tiny_batches, tmp_path / "sync", savers(tmp_path / "sync", False))
    write = saving.write_checkpoint_file
    threads = []

    def slow_write(checkpoint, filepath):  # training runs on while this write is under way
        threads.append(threading.current_thread().name)
        time.sleep(0.3)
        return write(checkpoint, filepath)

    monkeypatch.setattr(saving, "write_checkpoint_file", slow_write)
    fit(tiny_dit, tiny_batches, tmp_path / "async", savers(tmp_path / "async", True))
    assert threads and all(t.startswith("ditkit-checkpoint") for t in threads)
    for name in ("step=2.ckpt", "step=4.ckpt", "step=6.ckpt", "last.ckpt"):
        assert_same_file(tmp_path / "sync" / name, tmp_path / "async" / name)
    assert not list((tmp_path / "async").glob("*.tmp-*"))


def test_a_failed_background_write_stops_the_run_at_the_next_save(
    tmp_path, tiny_dit, tiny_batches, monkeypatch
):
    write, calls = saving.write_checkpoint_file, []

    def full_disk_on_the_third(checkpoint, filepath):
        calls.append(filepath)
        if len(calls) == 3:  # saves: step=2, last@2, step=4 (this one), last@4
            raise OSError(errno.ENOSPC, "No space left on device")
        return write(checkpoint, filepath)

    monkeypatch.setattr(saving, "write_checkpoint_file", full_disk_on_the_third)
    folder = tmp_path / "ckpt"
    with pytest.raises(CheckpointSaveError, match=r"step=4.ckpt: OSError: .*No space left"):
        fit(tiny_dit, tiny_batches, tmp_path, savers(folder, True, top_k=1), steps=20)
    # Raised at the next save (step 6), before it wrote anything: last.ckpt at step 4 was written
    # (the same step's writes do not wait for each other), and top_k=1 did not remove step=2.ckpt,
    # the last good one, for the step=4.ckpt that failed.
    assert len(calls) == 4
    assert torch.load(folder / "last.ckpt", weights_only=True)["global_step"] == 4
    assert (folder / "step=2.ckpt").exists() and not (folder / "step=4.ckpt").exists()
    assert not (folder / "step=6.ckpt").exists()
    assert not list(folder.glob("*.tmp-*"))


def test_async_save_with_sharded_checkpoints_is_refused_at_start(tmp_path, monkeypatch):
    monkeypatch.setattr(saving, "_writes_folders", lambda strategy: True)  # strategy=fsdp
    saver = AtomicModelCheckpoint(dirpath=tmp_path, async_save=True)
    with pytest.raises(ValueError, match=r"async_save=true .*\(strategy=fsdp\)"):
        saver.setup(L.Trainer(logger=False, accelerator="cpu"), None, "fit")
