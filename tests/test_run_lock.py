"""One run per folder (issue 14 item 1): the run lock refuses a second process naming the holder,
and dies with its holder (SIGKILL), even when the holder's forked DataLoader workers outlive it."""

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from ditkit.checkpoints.lock import (
    LOCK_NAME,
    RunLock,
    RunLockedError,
    is_first_process,
    read_holder,
)

REPO = Path(__file__).resolve().parents[1]

HOLDER = textwrap.dedent(
    """
    import multiprocessing, sys, time
    from ditkit.checkpoints.lock import RunLock

    def worker(started):
        started.set()
        time.sleep(120)

    lock = RunLock(sys.argv[1]).acquire()
    # A forked child (as a DataLoader worker is) that outlives the holder. The holder reports it
    # only once it runs: its after-fork hook (which closes its copy of the lock) has run by then,
    # as it has in any worker that reads data. Before that, for the microseconds between fork()
    # and the hook, the child still shares the lock.
    fork = multiprocessing.get_context("fork")
    started = fork.Event()
    child = fork.Process(target=worker, args=(started,))
    child.start()
    assert started.wait(60)
    print(child.pid, flush=True)
    time.sleep(120)
    """
)


def _wait_line(proc: subprocess.Popen) -> str:
    line = proc.stdout.readline()
    assert line, proc.stderr.read()
    return line.strip()


def test_a_second_process_is_refused_and_a_killed_holder_releases_the_lock(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    child = int(_wait_line(proc))
    try:
        holder = read_holder(tmp_path / LOCK_NAME)
        assert holder["pid"] == proc.pid
        with pytest.raises(RunLockedError) as refused:
            RunLock(tmp_path).acquire()
        message = str(refused.value)
        assert f"pid {proc.pid}," in message and holder["host"] in message
        assert holder["started"] in message and "run_name=" in message

        proc.send_signal(signal.SIGKILL)
        proc.wait()
        os.kill(child, 0)  # the forked child is still alive ...
        with RunLock(tmp_path) as lock:  # ... and yet the lock went with its holder
            assert read_holder(lock.path)["pid"] == os.getpid()
    finally:
        proc.kill()
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)
    RunLock(tmp_path).acquire().release()  # released on exit of the with block


def test_only_the_first_process_of_a_job_takes_the_lock(monkeypatch):
    for name in ("RANK", "LOCAL_RANK", "GROUP_RANK", "NODE_RANK", "SLURM_PROCID"):
        monkeypatch.delenv(name, raising=False)
    assert is_first_process()
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("SLURM_PROCID", "0")
    assert is_first_process()
    monkeypatch.setenv("NODE_RANK", "1")  # rank 0 of the second node
    assert not is_first_process()
    monkeypatch.delenv("NODE_RANK")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert not is_first_process()


@pytest.mark.slow
def test_train_py_refuses_a_second_run_in_the_same_folder(
    tmp_path,
    write_synthetic_shards,
    tiny_model,
    data_overrides,
    run_overrides,
    train_cmd,
    run_train,
):
    shards = write_synthetic_shards(tmp_path / "shards")
    args = [
        *tiny_model,
        *data_overrides(shards),
        *run_overrides(tmp_path, 2000, 1),
        "run_name=twice",
        "objective=flow",
    ]
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(
        train_cmd(*args), cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        ckpt = tmp_path / "twice/checkpoints/last.ckpt"
        deadline = time.time() + 180
        while not ckpt.exists():  # the first run is training
            assert first.poll() is None, first.communicate()[1][-3000:]
            assert time.time() < deadline
            time.sleep(0.05)
        second = run_train(*args, check=False)
        assert second.returncode != 0
        assert "is in use by another run" in second.stderr
        assert f"pid {first.pid}," in second.stderr
        assert first.poll() is None  # the first run trains on, unharmed
    finally:
        first.kill()
        first.communicate()


def test_a_refused_train_py_writes_nothing_into_the_busy_folder(
    tmp_path, write_synthetic_shards, tiny_model, data_overrides, run_overrides, run_train
):
    """The refusal comes before Hydra writes .hydra/ and the job log: the running job's files stay
    byte for byte as they were, and no file is added."""
    run = tmp_path / "busy"
    (run / ".hydra").mkdir(parents=True)
    sentinels = {
        ".hydra/config.yaml": b"the running job's config\n",
        ".hydra/overrides.yaml": b"- the running job's overrides\n",
        ".hydra/hydra.yaml": b"the running job's hydra config\n",
        "train.log": b"the running job's log\n",
    }
    for name, data in sentinels.items():
        (run / name).write_bytes(data)
    with RunLock(run):  # the test process is the running job
        holder = (run / LOCK_NAME).read_bytes()
        before = sorted(p.relative_to(run) for p in run.rglob("*"))
        args = [
            *tiny_model,
            *data_overrides(write_synthetic_shards(tmp_path / "shards")),
            *run_overrides(tmp_path, 2, 1),
            "run_name=busy",
        ]
        proc = run_train(*args, check=False, timeout=120)
        assert proc.returncode == 1, proc.stderr[-3000:]
        assert "RunLockedError: " in proc.stderr
        assert "is in use by another run" in proc.stderr
        assert f"pid {os.getpid()}," in proc.stderr  # names the holder: this process
        assert sorted(p.relative_to(run) for p in run.rglob("*")) == before
        for name, data in sentinels.items():
            assert (run / name).read_bytes() == data, name
        assert (run / LOCK_NAME).read_bytes() == holder


def test_run_lock_keeps_the_lock_this_process_already_holds(tmp_path, monkeypatch):
    """train.py's Hydra callback takes the lock first; main()'s run_lock must reuse it (a second
    flock from the same process would be refused) and leave its release to the callback."""
    import errno
    import warnings

    from ditkit.checkpoints import lock as lock_module

    for name in ("RANK", "LOCAL_RANK", "GROUP_RANK", "NODE_RANK", "SLURM_PROCID"):
        monkeypatch.delenv(name, raising=False)
    first = RunLock(tmp_path / "run").acquire()
    assert first.created is True
    with lock_module.run_lock(tmp_path / "run") as again:
        assert again is first
    assert lock_module.held_lock(tmp_path / "run") is first  # still held after the block
    first.release()
    assert lock_module.held_lock(tmp_path / "run") is None
    with pytest.raises(RunLockedError), RunLock(tmp_path / "run"):  # released: free again ...
        RunLock(tmp_path / "run").acquire()  # ... and held by the with block's lock

    # A file system without flock: one warning, and run_lock does not try (and warn) again.
    def no_flock(fd, op):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(lock_module.fcntl, "flock", no_flock)
    with pytest.warns(UserWarning, match="does not support flock"):
        unprotected = RunLock(tmp_path / "lustre").acquire()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with lock_module.run_lock(tmp_path / "lustre") as again:
            assert again is unprotected
    unprotected.release()
    assert lock_module.held_lock(tmp_path / "lustre") is None
