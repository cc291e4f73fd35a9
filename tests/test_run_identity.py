"""Run identity (issue 15): readable run names, the fingerprint that keeps auto-resume on the same
run, data keys filled in from the manifest, and no folder left behind by a command that fails."""

import json

import pytest

from ditkit.data.format import DataFormatError
from ditkit.data.manifest_keys import check_against_manifest, fill_from_manifest
from ditkit.training.identity import (
    IDENTITY,
    fingerprint,
    identity_mismatch,
    record_identity,
    removed_on_failure,
    run_name,
)

MANIFEST = {"latent_shape": [4, 16, 16], "image_size": 128, "num_classes": 7, "shards": ["a"]}
CAPTIONED = {**MANIFEST, "text": {"context_len": 77, "context_dim": 64, "pooled_dim": 32}}


def test_run_name_leads_with_what_the_run_is_and_ignores_what_trains_nothing():
    assert run_name([]) == "default"
    assert run_name(["objective=flow", "model=dit_b"]) == "model-dit_b+objective-flow"
    # Sorted by experiment, model, objective, data, then the rest; "/" made safe.
    assert (
        run_name(["optimizer.lr=0.001", "data=digits", "model.depth=2", "experiment=quickstart"])
        == "experiment-quickstart+model.depth-2+data-digits+optimizer.lr-0.001"
    )
    assert (
        run_name(["model=dit_s", "data.batch_size=8", "a/b=c"])
        == "model-dit_s+data.batch_size-8+a_b-c"
    )
    # Loggers, callbacks (FID reference, Inception weights), paths, workers, data place: no change.
    untrained = [
        "logger=csv",
        "logger.group=dit-vs-unet",
        "+callbacks@callbacks.fid=fid",
        "callbacks.fid.inception_weights=/w/pt_inception.pth",
        "~callbacks.sample_grid",
        "data.num_workers=3",
        "data.root=/data/setB",
        "trainer.max_steps=9",
        "paths.output_dir=/tmp/x",
        "hydra/launcher=submitit_slurm",
        "resume=force",
    ]
    assert run_name(["model=unet_s", *untrained]) == "model-unet_s"


def test_long_run_names_keep_the_group_choices_and_hash_the_rest():
    """The README's DiT-vs-U-Net sweep was cut to `+callbacks@callbacks.fid-fid+...-c8f5178d05`."""
    rest = [f"model.k{i}={i}" for i in range(30)]
    name = run_name(["experiment=quickstart", "model=dit_s", "objective=flow", *rest])
    assert name.startswith("experiment-quickstart+model-dit_s+objective-flow+rest-")
    assert len(name.rsplit("-", 1)[1]) == 10  # sha1 prefix of the rest
    other = run_name(["experiment=quickstart", "model=dit_s", "objective=flow", *rest, "seed=1"])
    assert other != name and other.rsplit("-", 1)[0] == name.rsplit("-", 1)[0]


def config(**changes):
    cfg = {
        "model": {"depth": 2, "hidden_size": 32},
        "objective": {"_target_": "flow"},
        "optimizer": {"lr": 1e-4},
        "lr_schedule": {"warmup_steps": 0},
        "seed": 0,
        "data": {"root": "/data/setA", "batch_size": 4, "num_workers": 8, "latent_size": 16},
        "logger": {"group": "a"},
        "callbacks": {"fid": {"inception_weights": "/a.pth"}},
        "trainer": {"max_steps": 10},
    }
    for dotted, value in changes.items():
        *parents, leaf = dotted.split(".")
        node = cfg
        for p in parents:
            node = node[p]
        node[leaf] = value
    return cfg


def test_fingerprint_covers_what_is_trained_only():
    base = fingerprint(config(), MANIFEST)["fingerprint"]
    for same in (
        {"data.root": "/elsewhere"},
        {"data.num_workers": 1},
        {"logger.group": "b"},
        {"callbacks.fid.inception_weights": "/b.pth"},
        {"trainer.max_steps": 99},
    ):
        assert fingerprint(config(**same), MANIFEST)["fingerprint"] == base, same
    for other in ({"seed": 1}, {"optimizer.lr": 2e-4}, {"model.depth": 3}, {"data.batch_size": 8}):
        assert fingerprint(config(**other), MANIFEST)["fingerprint"] != base, other
    moved = {**MANIFEST, "shards": ["b"]}
    assert fingerprint(config(), moved)["fingerprint"] != base


def test_a_mismatch_names_each_differing_key_and_both_ways_on(tmp_path):
    record_identity(tmp_path, fingerprint(config(), MANIFEST))
    assert identity_mismatch(tmp_path, fingerprint(config(**{"data.root": "/b"}), MANIFEST)) is None
    new = fingerprint(config(**{"data.root": "/data/setB", "seed": 5}), {**MANIFEST, "shards": []})
    message = identity_mismatch(tmp_path, new)
    assert "seed: 0 -> 5" in message
    assert "data: the shards' manifest differs (/data/setA -> /data/setB" in message
    assert "run_name=<new name>" in message and "resume=force" in message
    assert (
        identity_mismatch(tmp_path / "fresh", new) is None
    )  # no identity recorded: nothing to refuse


def test_manifest_fills_unset_keys_and_checks_set_ones_all_at_once():
    data = {"latent_size": 32, "latent_channels": 4, "image_size": 256, "num_classes": 1000}
    assert fill_from_manifest(data, MANIFEST, explicit=[], text=False) == {
        "latent_size": 16,
        "image_size": 128,
        "num_classes": 7,
    }
    # A text-to-image model takes the captioned set's embedding shape; a class-label one does not.
    filled = fill_from_manifest({**data, "context_len": None}, CAPTIONED, explicit=[], text=True)
    assert filled["context_len"] == 77 and filled["pooled_dim"] == 32
    assert "context_len" not in fill_from_manifest(data, CAPTIONED, explicit=[], text=False)
    with pytest.raises(DataFormatError) as err:
        fill_from_manifest(data, MANIFEST, explicit=["image_size", "num_classes"], text=False)
    message = str(err.value)
    assert "data.image_size=256, but the shards have 128: pass data.image_size=128" in message
    assert "data.num_classes=1000, but the shards have 7: pass data.num_classes=7" in message
    assert "latent_size" not in message  # not set on the command line: filled, not an error
    check_against_manifest({"latent_size": 16, "num_classes": 7}, MANIFEST)  # consistent: fine


def test_a_failed_command_removes_the_folder_it_made_and_nothing_else(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / ".hydra").mkdir()
    with pytest.raises(RuntimeError), removed_on_failure(run, run / "checkpoints"):
        record_identity(run, {"fingerprint": "x", "trained": {}})
        raise RuntimeError("boom")
    assert not run.exists()
    # A folder another command made (identity.json present) or one with a checkpoint stays.
    for kept in ("identity", "checkpoint"):
        run = tmp_path / kept
        (run / "checkpoints").mkdir(parents=True)
        if kept == "identity":
            (run / IDENTITY).write_text(json.dumps({"fingerprint": "y"}))
        else:
            (run / "checkpoints" / "last.ckpt").write_bytes(b"")
        with pytest.raises(KeyboardInterrupt), removed_on_failure(run, run / "checkpoints"):
            raise KeyboardInterrupt
        assert run.is_dir()


@pytest.mark.parametrize("failure", [RuntimeError, KeyboardInterrupt])
@pytest.mark.parametrize("checkpoint", ["last.ckpt", "step=0000004.ckpt", "fsdp"])
def test_a_run_that_fails_after_its_first_checkpoint_keeps_its_folder(
    tmp_path, failure, checkpoint
):
    """A fresh run (its own folder, made_here=True) that saved a checkpoint and then fails, as
    rank 0 does when torchrun's restart kills its peer, keeps the folder and every file in it:
    the restarted group resumes from that checkpoint."""
    run = tmp_path / "run"
    with pytest.raises(failure), removed_on_failure(run, run / "checkpoints", made_here=True):
        run.mkdir()
        record_identity(run, {"fingerprint": "x", "trained": {}})
        if checkpoint == "fsdp":  # a sharded (DCP) checkpoint is a folder named last.ckpt
            (run / "checkpoints/last.ckpt").mkdir(parents=True)
            (run / "checkpoints/last.ckpt/__0_0.distcp").write_bytes(b"shard")
        else:
            (run / "checkpoints").mkdir()
            (run / "checkpoints" / checkpoint).write_bytes(b"weights")
        files = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
        raise failure("the peer is gone")
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == files


def test_a_failed_command_never_removes_a_folder_that_existed_before_it(tmp_path):
    """made_here=False (the run lock found the folder already there, before Hydra wrote into it):
    nothing is removed, even with neither identity.json nor a checkpoint in it."""
    from ditkit.checkpoints.lock import RunLock

    run = tmp_path / "theirs"
    run.mkdir()
    (run / "notes.txt").write_text("the user's")
    lock = RunLock(run).acquire()
    assert lock.created is False
    with pytest.raises(RuntimeError), removed_on_failure(run, run / "checkpoints", lock.created):
        raise RuntimeError("boom")
    lock.release()
    assert (run / "notes.txt").read_text() == "the user's"
    # A folder the lock made is the command's own: removed when it fails before a checkpoint.
    fresh = tmp_path / "fresh"
    lock = RunLock(fresh).acquire()
    assert lock.created is True
    with pytest.raises(RuntimeError), removed_on_failure(fresh, fresh / "checkpoints", True):
        raise RuntimeError("boom")
    lock.release()
    assert not fresh.exists()


@pytest.mark.slow
def test_train_py_fills_from_the_manifest_resumes_only_the_same_run(
    tmp_path, tiny_model, write_synthetic_shards, run_overrides, run_train
):
    """data.root= alone trains on 8x8x4 shards (the config says 32x32x4); the same command resumes;
    other shards of the same shape in the same folder are refused before any work; resume=force
    continues; a command that fails before its first checkpoint leaves no folder. (Five train.py
    processes: slow.)"""
    set_a = write_synthetic_shards(tmp_path / "setA", seed=0)
    set_b = write_synthetic_shards(tmp_path / "setB", seed=1)
    manifest = json.loads((set_b / "manifest.json").read_text())  # same shape, other source images
    (set_b / "manifest.json").write_text(json.dumps({**manifest, "source": {"root": "/imgs/B"}}))
    out = tmp_path / "out"
    model = [o for o in tiny_model if not o.startswith("data.")]

    def cmd(root, steps, *extra):
        return [
            *model,
            "data=imagenet_latents",
            f"data.root={root}",
            "data.batch_size=4",
            "data.num_workers=0",
            *run_overrides(out, steps, 2),
            *extra,
        ]

    first = run_train(*cmd(set_a, 2))
    assert "data.latent_size=8 (from the shards' manifest)" in first.stdout + first.stderr
    (run,) = out.iterdir()
    assert json.loads((run / IDENTITY).read_text())["trained"]["data.latent_size"] == 8
    again = run_train(*cmd(set_a, 4))
    assert "resuming from" in again.stdout + again.stderr
    refused = run_train(*cmd(set_b, 6), check=False)
    assert refused.returncode != 0
    assert (
        "data: the shards' manifest differs" in refused.stderr and "resume=force" in refused.stderr
    )
    assert "resuming from" not in refused.stdout + refused.stderr
    forced = run_train(*cmd(set_b, 6, "resume=force"))
    assert "resuming from" in forced.stdout + forced.stderr
    # Set on the command line and wrong: one error, each key with its fix, and no folder left.
    failed = run_train(*cmd(set_a, 2, "data.image_size=256", "data.num_classes=3"), check=False)
    assert failed.returncode != 0
    assert "pass data.image_size=8" in failed.stderr and "pass data.num_classes=10" in failed.stderr
    assert [p.name for p in out.iterdir()] == [run.name]
