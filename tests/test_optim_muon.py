"""ditkit.training.optim.Muon: on one process, bit for bit torch.optim.Muon on the hidden matrices
plus torch.optim.AdamW(fused=True) on the rest; state_dict round trip; LambdaLR; and under FSDP2
(2 gloo processes, uneven shards) bit for bit the one-process run, which Newton-Schulz on each
rank's shard alone is not."""

import copy
import io
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor
from torch.optim._muon import _zeropower_via_newtonschulz

from ditkit.models import DiT
from ditkit.training.optim import Muon
from ditkit.training.parallel import shard_blocks

HPARAMS = {"lr": 0.02, "weight_decay": 0.1, "adamw_lr": 1e-3, "adamw_weight_decay": 0.01}
# mlp_ratio 1.25: fc1.weight is (45, 36), so 2 FSDP2 ranks hold 23 and 22 rows (uneven shards).
UNEVEN = "model.blocks.0.mlp.fc1.weight"


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread (2-core machines; the same reduction order in every process)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Wrapper(nn.Module):
    """Holds the DiT as `model`, so parameter names start with `model.` as in DiffusionModule."""

    def __init__(self):
        super().__init__()
        self.model = DiT(
            input_size=8,
            patch_size=2,
            in_channels=4,
            hidden_size=36,
            depth=2,
            num_heads=2,
            mlp_ratio=1.25,
            num_classes=10,
            class_dropout_prob=0.0,  # no label dropout: the same forward on every process
        )


def tiny(seed: int = 0) -> Wrapper:
    """The tiny DiT with N(0, 0.1^2) weights: adaLN-Zero's initialisation zeroes the gates and the
    output layer, which would leave most gradients of the first steps exactly zero."""
    torch.manual_seed(seed)
    wrapper = Wrapper()
    with torch.no_grad():
        for p in wrapper.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    return wrapper


def backward(wrapper: Wrapper) -> None:
    """Gradients of a loss on the output for a fixed batch: x (4, 4, 8, 8), t (4,), y (4,)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 4, 8, 8, generator=g)
    t = torch.randint(0, 1000, (4,), generator=g)
    y = torch.randint(0, 10, (4,), generator=g)
    wrapper.model(x, t, y).square().mean().backward()


def step_together(model: nn.Module, optimizers: list, copies: tuple = ()) -> None:
    """One step of every optimizer from the gradients of `model`, copied into each of `copies`."""
    for opt in optimizers:
        opt.zero_grad()
    backward(model)
    for other in copies:
        for p, q in zip(model.parameters(), other.parameters()):
            q.grad = p.grad.clone()
    for opt in optimizers:
        opt.step()


def assert_same(a: nn.Module, b: nn.Module) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name


def test_split_by_name_and_shape():
    opt = Muon(list(tiny().named_parameters()))
    muon, adamw = opt.param_groups
    assert (muon["algorithm"], adamw["algorithm"]) == ("muon", "adamw")
    assert "model.blocks.0.attn.qkv.weight" in muon["param_names"]
    assert "model.blocks.1.adaLN_modulation.1.weight" in muon["param_names"]
    for name in (
        "model.blocks.0.attn.qkv.bias",
        "model.x_embedder.proj.weight",  # 4-D conv
        "model.final_layer.linear.weight",
        "model.y_embedder.embedding_table.weight",
    ):
        assert name in adamw["param_names"], name
    assert all(p.ndim == 2 for p in muon["params"])
    assert len(muon["params"]) == 10  # qkv, proj, fc1, fc2, adaLN of 2 blocks
    assert sorted(muon["param_names"] + adamw["param_names"]) == sorted(
        n for n, _ in tiny().named_parameters()
    )
    # A name match alone is not enough: the 4-D patch embedding stays on AdamW.
    wide = Muon(list(tiny().named_parameters()), hidden=r"^model\.(blocks|x_embedder)\.")
    assert "model.x_embedder.proj.weight" in wide.param_groups[1]["param_names"]


def test_rejects_unnamed_parameters():
    model = tiny()
    with pytest.raises(ValueError, match="named_parameters"):
        Muon(model.parameters())


def test_equals_torch_muon_plus_fused_adamw():
    ours = tiny()
    ref = copy.deepcopy(ours)
    opt = Muon(list(ours.named_parameters()), **HPARAMS)
    by_name = dict(ref.named_parameters())
    muon, adamw = opt.param_groups
    ref_muon = torch.optim.Muon(
        [by_name[n] for n in muon["param_names"]],
        lr=HPARAMS["lr"],
        weight_decay=HPARAMS["weight_decay"],
        momentum=0.95,
        nesterov=True,
        adjust_lr_fn="match_rms_adamw",
    )
    ref_adamw = torch.optim.AdamW(
        [by_name[n] for n in adamw["param_names"]],
        lr=HPARAMS["adamw_lr"],
        weight_decay=HPARAMS["adamw_weight_decay"],
        fused=True,
    )
    start = copy.deepcopy(ours)
    for _ in range(3):
        step_together(ours, [opt, ref_muon, ref_adamw], copies=(ref,))
    assert adamw["fused"]
    assert_same(ours, ref)
    assert not any(torch.equal(p, q) for p, q in zip(ours.parameters(), start.parameters()))
    for p, q in zip(muon["params"], ref_muon.param_groups[0]["params"]):
        assert torch.equal(opt.state[p]["momentum_buffer"], ref_muon.state[q]["momentum_buffer"])
    for p, q in zip(adamw["params"], ref_adamw.param_groups[0]["params"]):
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(opt.state[p][key], ref_adamw.state[q][key]), key


def test_state_dict_round_trip():
    model = tiny()
    opt = Muon(list(model.named_parameters()), **HPARAMS)
    for _ in range(2):
        step_together(model, [opt])
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    resumed_model = copy.deepcopy(model)
    # Default hyperparameters: load_state_dict must bring back the saved ones with the state.
    resumed = Muon(list(resumed_model.named_parameters()))
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert resumed.param_groups[0]["lr"] == HPARAMS["lr"]
    assert resumed.param_groups[1]["weight_decay"] == HPARAMS["adamw_weight_decay"]
    step_together(model, [opt, resumed], copies=(resumed_model,))
    assert_same(model, resumed_model)
    for p, q in zip(model.parameters(), resumed_model.parameters()):
        for key, value in opt.state[p].items():
            assert torch.equal(value, resumed.state[q][key]), key


def test_lambda_lr_scales_both_groups():
    model = tiny()
    opt = Muon(list(model.named_parameters()), **HPARAMS)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5**step)
    for _ in range(3):
        step_together(model, [opt])
        sched.step()
    # LambdaLR sets lr = base_lr * lambda(step): the same float product as here, so ==.
    assert opt.param_groups[0]["lr"] == HPARAMS["lr"] * 0.125
    assert opt.param_groups[1]["lr"] == HPARAMS["adamw_lr"] * 0.125


def test_empty_groups_and_foreach_fallback():
    model = tiny()
    only_adamw = Muon(list(model.named_parameters()), hidden="^$")
    only_muon = Muon([(n, p) for n, p in model.named_parameters() if n == UNEVEN])
    assert not only_adamw.param_groups[0]["params"] and not only_muon.param_groups[1]["params"]
    step_together(model, [only_adamw, only_muon])

    # Complex tensors have no fused kernel: the AdamW group falls back to torch's foreach path.
    z = nn.Parameter(torch.randn(5, dtype=torch.complex64))
    z_ref = nn.Parameter(z.detach().clone())
    opt = Muon([("z", z)], adamw_lr=1e-3)
    ref = torch.optim.AdamW([z_ref], lr=1e-3, weight_decay=0.0, foreach=True)
    assert not opt.param_groups[1]["fused"]
    for _ in range(2):
        z.grad = torch.randn_like(z)
        z_ref.grad = z.grad.clone()
        opt.step()
        ref.step()
    assert torch.equal(z, z_ref)


# ------------------------------------------------------------------ FSDP2, 2 gloo processes


class ShardLocalMuon(Muon):
    """The bug the FSDP2 test guards against: Newton-Schulz on this rank's rows only."""

    def _orthogonalize(self, update, group):
        local = _zeropower_via_newtonschulz(
            update.to_local(), group["ns_coefficients"], group["ns_steps"], group["eps"]
        )
        return DTensor.from_local(
            local,
            update.device_mesh,
            update.placements,
            run_check=False,
            shape=update.shape,
            stride=update.stride(),
        )


def train(wrapper: Wrapper, optimizer_class: type = Muon) -> dict[str, torch.Tensor]:
    """2 steps on the fixed batch; the full parameters afterwards, by name."""
    opt = optimizer_class(list(wrapper.named_parameters()), **HPARAMS)
    for _ in range(2):
        step_together(wrapper, [opt])
    if isinstance(opt.param_groups[0]["params"][0], DTensor):
        check_sharded_state(wrapper, opt)
    return {
        name: p.full_tensor() if isinstance(p, DTensor) else p.detach().clone()
        for name, p in wrapper.named_parameters()
    }


def check_sharded_state(wrapper: Wrapper, opt: Muon) -> None:
    """Momentum stays sharded like the gradient; the state survives torch.distributed.checkpoint's
    get/set_optimizer_state_dict (what Lightning's ModelParallelStrategy saves and loads)."""
    p = dict(wrapper.named_parameters())[UNEVEN]
    buf = opt.state[p]["momentum_buffer"]
    assert buf.placements == p.grad.placements and buf.to_local().shape == p.to_local().shape
    fresh = Muon(list(wrapper.named_parameters()))
    set_optimizer_state_dict(wrapper, fresh, get_optimizer_state_dict(wrapper, opt))
    for q, state in opt.state.items():
        for key, value in state.items():
            assert torch.equal(value, fresh.state[q][key]), key


def fsdp_worker(rank: int, port: int, out: str) -> None:
    """Rank `rank` of 2: every FSDP2 variant on the same seed and the same full batch, so the
    averaging reduce-scatter returns the one-process gradient exactly ((g + g) / 2 == g)."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    results = {}
    for variant, mesh_shape, optimizer_class in (
        ("fsdp", (2,), Muon),
        ("hsdp", (1, 2), Muon),  # 2-D mesh: placements (Replicate(), Shard(0))
        ("shard_local", (2,), ShardLocalMuon),
    ):
        names = ("replicate", "shard")[-len(mesh_shape) :]
        wrapper = tiny()
        shard_blocks(wrapper.model, init_device_mesh("cpu", mesh_shape, mesh_dim_names=names))
        results[variant] = train(wrapper, optimizer_class)
    if rank == 0:
        torch.save(results, out)
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_fsdp2_two_processes_equal_one_process(tmp_path, monkeypatch):
    # fork, not spawn: the children inherit the imported modules (spawn re-imports Lightning in
    # each, ~30 s on 2 cores). The parent holds no process group; the children set one thread
    # themselves (fsdp_worker), OMP_NUM_THREADS only matters to a fresh OpenMP runtime.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = str(tmp_path / "fsdp.pt")
    mp.start_processes(fsdp_worker, args=(free_port(), out), nprocs=2, start_method="fork")
    results = torch.load(out, weights_only=True)
    single = train(tiny())
    assert single[UNEVEN].shape[0] % 2 == 1  # uneven shards: 23 and 22 rows
    for variant in ("fsdp", "hsdp"):
        for name, value in single.items():
            assert torch.equal(results[variant][name], value), (variant, name)
    # Newton-Schulz of a block of rows is not the rows of Newton-Schulz of the matrix.
    assert not torch.equal(results["shard_local"][UNEVEN], single[UNEVEN])
