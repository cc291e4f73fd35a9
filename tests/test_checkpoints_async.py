"""Asynchronous checkpoints (issue 14 item 3): the background write holds the state of the step it
was taken at, bit for bit, while training goes on; a failed background write stops the run at the
next save and retention keeps the last good file; sharded (FSDP2) folders are committed at the next
save, and only when every rank wrote them (the 2-process runs: test_checkpoints_async_fsdp.py)."""

import errno
import threading
import time
from concurrent.futures import Future

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from ditkit.checkpoints import AtomicModelCheckpoint, CheckpointSaveError, saving, sharded_async
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


class OneRank:
    """The strategy calls ShardedAsyncWriter.commit makes, on a world of one rank."""

    is_global_zero = True

    def __init__(self):
        self.votes = []

    def reduce_boolean_decision(self, decision, all=True):
        self.votes.append(decision)
        return decision


def test_sharded_async_saves_commit_at_the_next_save_and_only_if_written(tmp_path, monkeypatch):
    groups, calls = [], []
    monkeypatch.setattr(
        sharded_async.dist, "new_group", lambda backend: groups.append(backend) or object()
    )
    futures = [Future(), Future()]

    def async_save(state, checkpoint_id, process_group):
        calls.append((state, checkpoint_id, process_group))
        return futures[len(calls) - 1]

    monkeypatch.setattr(sharded_async.dcp, "async_save", async_save)
    for name, content in (("last.ckpt", "step 2"), ("step=2.ckpt", "step 2")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "shard").write_text(content)
    writer, strategy, removed = sharded_async.ShardedAsyncWriter(), OneRank(), []
    tmps = [tmp_path / f"{name}.tmp-x" for name in ("step=4.ckpt", "last.ckpt")]
    for tmp in tmps:
        tmp.mkdir()
        (tmp / "shard").write_text("step 4")
    writer.submit({"state_dict": 1}, tmps[0], str(tmp_path / "step=4.ckpt"), 4)
    writer.then(lambda: removed.append("step=2.ckpt"))  # top_k=1: the older folder goes
    writer.submit({"state_dict": 2}, tmps[1], str(tmp_path / "last.ckpt"), 4)
    # two saves in flight at once, each on its own gloo group, into the temporary folders
    assert groups == ["gloo", "gloo"] and writer.in_flight() == 2 and not removed
    assert [c[1] for c in calls] == tmps and calls[0][2] is not calls[1][2]
    # the same step's second save commits nothing; the next step's waits for both
    assert writer.commit(strategy, before_step=4) == (None, None) and writer.in_flight() == 2
    error = OSError(28, "No space left on device")
    futures[0].set_exception(error)  # rank 1's disk was full
    futures[1].set_result(None)
    assert writer.commit(strategy, before_step=6) == (str(tmp_path / "step=4.ckpt"), error)
    assert strategy.votes == [False, True] and writer.in_flight() == 0
    writer.close()  # the replaced last.ckpt is deleted in the background
    # the failed folder is dropped, the older one kept (retention skipped), last.ckpt replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "step=2.ckpt"]
    assert removed == []
    assert (tmp_path / "last.ckpt" / "shard").read_text() == "step 4"
    assert (tmp_path / "step=2.ckpt" / "shard").read_text() == "step 2"
