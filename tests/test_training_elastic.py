"""Elastic restart (issue 14 item 6): under `torchrun --max-restarts=1`, one worker of a 2-process
DDP run is SIGKILLed mid-training; torchrun restarts the group, which resumes from the last
checkpoint (resume=auto) and reaches max_steps with the weights, EMA and AdamW moments of an
uninterrupted run, bit for bit: every draw is a function of (seed, step, rank).

torchrun keeps one store for every attempt of the group, with the killed attempt's keys in it; a
restarted rank that read its peer's old address connected to the dead worker and failed after the
connect timeout, whenever the ranks started close together. ditkit.training.elastic gives each
attempt its own keys; the two fast tests check that on a store of their own."""

import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
STEPS = 8


def torchrun(*overrides: str, restarts: int = 0) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        f"--max-restarts={restarts}",
        str(REPO / "train.py"),
        *overrides,
    ]


@pytest.mark.slow
def test_a_killed_worker_is_restarted_and_the_run_ends_as_if_uninterrupted(
    tmp_path, write_synthetic_shards, tiny_model, data_overrides, run_overrides, run_train
):
    shards = write_synthetic_shards(tmp_path / "shards")

    def args(name):
        return [
            *tiny_model,
            *data_overrides(shards),
            *run_overrides(tmp_path, STEPS, 2),
            f"run_name={name}",
            "strategy=ddp",
            "trainer.devices=2",
            "objective=flow",
            "optimizer.lr=1e-3",
            "module.ema_decay=0.5",
        ]

    run_train(cmd=torchrun(*args("straight")), timeout=400)
    kill = [
        "+callbacks.kill._target_=train_callbacks.KillOnFirstAttempt",
        "+callbacks.kill.rank=1",
        "+callbacks.kill.step=5",
    ]
    proc = run_train(cmd=torchrun(*args("killed"), *kill, restarts=1), timeout=600)
    log = proc.stdout + proc.stderr
    assert "Signals.SIGKILL" in log or "exitcode: -9" in log  # the kill happened ...
    assert "ditkit: resuming from" in log  # ... and the restarted group resumed
    a = torch.load(tmp_path / "straight/checkpoints/last.ckpt", weights_only=True)
    b = torch.load(tmp_path / "killed/checkpoints/last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] == STEPS
    assert any(k.startswith("ema.") for k in a["state_dict"])
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    sa, sb = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    for i in sa:
        for moment in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(sa[i][moment], sb[i][moment]), (i, moment)


def _agent_env(monkeypatch, port: int, restart: int, nodes: int = 1) -> None:
    """The environment torchrun's agent gives a worker that shares its store."""
    env = {
        "TORCHELASTIC_USE_AGENT_STORE": "True",
        "TORCHELASTIC_MAX_RESTARTS": "1",
        "TORCHELASTIC_RESTART_COUNT": str(restart),
        "GROUP_WORLD_SIZE": str(nodes),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "RANK": "0",
        "WORLD_SIZE": "1",
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)


def test_each_restart_reads_and_writes_only_its_own_keys_in_torchruns_store(monkeypatch):
    import importlib

    from ditkit.training.elastic import isolate_restarts

    rdzv = importlib.import_module("torch.distributed.rendezvous")
    monkeypatch.setitem(rdzv._rendezvous_handlers, "env", rdzv._rendezvous_handlers["env"])
    agent = torch.distributed.TCPStore("127.0.0.1", 0, 1, is_master=True)  # torchrun's store
    agent.set("ditkit/attempt_0/rank_1", "address of the killed worker")
    _agent_env(monkeypatch, agent.port, restart=1)
    assert isolate_restarts() == "ditkit/attempt_1"
    assert isolate_restarts() == "ditkit/attempt_1"  # a second call wraps nothing twice
    store, rank, world_size = next(torch.distributed.rendezvous("env://"))
    assert (rank, world_size) == (0, 1)
    assert not store.check(["rank_1"])  # the killed attempt's key is not seen ...
    store.set("rank_0", "new address")
    assert agent.get("ditkit/attempt_1/rank_0") == b"new address"  # ... and this one's is apart


def test_restarts_on_several_nodes_leave_the_store_alone_and_say_what_to_do(monkeypatch):
    import importlib

    from ditkit.training.elastic import isolate_restarts

    rdzv = importlib.import_module("torch.distributed.rendezvous")
    handler = rdzv._rendezvous_handlers["env"]
    monkeypatch.setitem(rdzv._rendezvous_handlers, "env", handler)
    _agent_env(monkeypatch, 1, restart=1, nodes=2)
    with pytest.warns(UserWarning, match="TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1"):
        assert isolate_restarts() is None
    assert rdzv._rendezvous_handlers["env"] is handler
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "0")  # no restarts: nothing to isolate
    monkeypatch.setenv("GROUP_WORLD_SIZE", "1")
    assert isolate_restarts() is None
    assert rdzv._rendezvous_handlers["env"] is handler
