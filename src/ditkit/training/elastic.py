"""torchrun restarts: give each attempt of a worker group its own keys in torchrun's store.

torchrun's agent hosts one TCP store for its workers (TORCHELASTIC_USE_AGENT_STORE=True) and, in
the PyTorch installed here, keeps the same store for every restart of the group. The process group
writes fixed keys into it (gloo: each rank's listening address; NCCL: the unique id), so the
restarted workers find the keys of the killed attempt already there. A rank that reads the other
rank's key before that rank has rewritten it connects to a dead process: `Gloo connectFullMesh
failed ... Connection refused` on the address of the killed worker, after a stall of the connect
timeout. Whether it happens is a race between the ranks' start-up times.

`isolate_restarts()` puts every key of attempt N under `ditkit/attempt_N/`, N being
TORCHELASTIC_RESTART_COUNT. That counter is exact for the workers of one agent (one node: all of
them restart together). With several agents (nodes) it is not shared: an agent whose own workers
were healthy restarts them without counting. There ditkit leaves the store alone and says so; start
torchrun with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 so that each attempt's rank 0 hosts a new store.
"""

from __future__ import annotations

import os
import warnings


def _agent_store_restarts() -> bool:
    return (
        os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
        and int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0
    )


def isolate_restarts() -> str | None:
    """Under torchrun with restarts and one agent, make env:// rendezvous (what Lightning's
    strategies use) hand the process group a store prefixed by this attempt; returns the prefix, or
    None when nothing was changed (not under such a torchrun, or several agents). Call it in each
    worker before the process group is created; calling it again changes nothing."""
    if not _agent_store_restarts():
        return None
    if int(os.environ.get("GROUP_WORLD_SIZE", "1")) != 1:
        warnings.warn(
            "ditkit: torchrun restarts on several nodes reuse torchrun's store, where a restarted "
            "worker can read a killed worker's address and fail to connect; start torchrun with "
            "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 on every node.",
            stacklevel=2,
        )
        return None
    import importlib

    from torch.distributed import PrefixStore

    # the module, not the function of the same name that torch.distributed exports
    rdzv = importlib.import_module("torch.distributed.rendezvous")

    prefix = f"ditkit/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    handlers = rdzv._rendezvous_handlers  # no public way to wrap a registered scheme
    original = handlers["env"]
    if getattr(original, "ditkit_prefix", None) is not None:
        return original.ditkit_prefix

    def env_handler(url, **kwargs):
        store, rank, world_size = next(original(url, **kwargs))
        yield PrefixStore(prefix, store), rank, world_size
        raise RuntimeError("Unable to perform re-rendezvous using env:// method")

    env_handler.ditkit_prefix = prefix
    handlers["env"] = env_handler
    return prefix
