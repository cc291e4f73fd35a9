"""Objective terms with their own trainable parameters (ditkit.objectives.Term): the value equals a
hand computation, the parameters are in the optimizer and the checkpoint, a detached probe leaves the
backbone's gradients alone, and under 2-process FSDP2 the head is sharded and resumes exactly."""

import copy
from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from ditkit.checkpoints import consolidate_checkpoint
from ditkit.objectives import GaussianDiffusion, LinearProbe, RectifiedFlow
from ditkit.training import DiffusionModule

PROBE = [
    "+objective.terms.probe._target_=ditkit.objectives.LinearProbe",
    "+objective.terms.probe.depth=1",
]


# One intra-op thread for every test here (the shared `one_thread` fixture).
pytestmark = pytest.mark.usefixtures("one_thread")


def batch(n: int = 4) -> dict:
    g = torch.Generator().manual_seed(1)
    return {"x": torch.randn(n, 4, 8, 8, generator=g), "y": torch.randint(0, 10, (n,), generator=g)}


def test_probe_value_is_the_cross_entropy_of_the_pooled_hidden_state(tiny_dit):
    """By hand in float64: hidden tokens after block 1 (captured by a hook of our own), mean over
    tokens, the head, cross-entropy of the label; the loss is the objective's plus weight x that."""
    model = tiny_dit().double()
    term = LinearProbe(depth=1, weight=0.5).double()
    flow = RectifiedFlow(terms={"probe": term})
    flow.bind(model)
    term.double()
    b = {"x": batch()["x"].double(), "y": batch()["y"]}
    seen = {}
    model.blocks[0].register_forward_hook(lambda m, a, out: seen.update(h=out))
    t = torch.tensor([0.1, 0.4, 0.6, 0.9], dtype=torch.float64)
    noise = torch.randn(4, 4, 8, 8, dtype=torch.float64)
    losses = flow.training_losses(model, b, t=t, noise=noise)
    logits = seen["h"].mean(1) @ term.head.weight.T + term.head.bias
    expected = F.cross_entropy(logits, b["y"], reduction="none")
    torch.testing.assert_close(losses["probe"], expected, rtol=0, atol=1e-12)
    plain = RectifiedFlow().training_losses(model, b, t=t, noise=noise)
    torch.testing.assert_close(losses["mse"], plain["mse"], rtol=0, atol=0)
    torch.testing.assert_close(losses["loss"], plain["loss"] + 0.5 * expected, rtol=0, atol=1e-12)


def test_a_detached_probe_trains_its_head_and_leaves_the_backbone_gradients_alone(tiny_dit):
    model = tiny_dit()
    reference = copy.deepcopy(model)
    objective = GaussianDiffusion(terms={"probe": LinearProbe(depth=2)})
    objective.bind(model)
    torch.manual_seed(5)
    objective.training_losses(model, batch())["loss"].mean().backward()
    torch.manual_seed(5)
    GaussianDiffusion().training_losses(reference, batch())["loss"].mean().backward()
    for (name, a), b in zip(model.named_parameters(), reference.parameters()):
        assert torch.equal(a.grad, b.grad), name
    assert objective.terms["probe"].head.weight.grad.abs().sum() > 0


def test_the_term_is_in_the_optimizer_the_checkpoint_and_the_log(tmp_path, tiny_dit, tiny_batches):
    from ditkit.checkpoints import AtomicModelCheckpoint

    module = DiffusionModule(
        tiny_dit(),
        RectifiedFlow(terms={"probe": LinearProbe(depth=1)}),
        optimizer=partial(torch.optim.AdamW, lr=1e-2, weight_decay=0.0, fused=True),
    )
    head = module.objective_modules["probe"].head
    before = head.weight.detach().clone()
    data = tiny_batches(32)
    saver = AtomicModelCheckpoint(
        dirpath=tmp_path, every_n_train_steps=3, save_top_k=0, save_last=True
    )
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=3,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[saver],
    )
    trainer.fit(module, DataLoader(data, batch_size=4))
    names = trainer.optimizers[0].param_groups[0]["param_names"]
    assert "objective_modules.probe.head.weight" in names and names[0].startswith("model.")
    assert not torch.equal(head.weight.detach(), before)  # trained
    assert "train/probe" in trainer.callback_metrics
    ckpt = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert torch.equal(ckpt["state_dict"]["objective_modules.probe.head.weight"], head.weight)
    index = names.index("objective_modules.probe.head.weight")
    assert ckpt["optimizer_states"][0]["state"][index]["exp_avg"].shape == head.weight.shape


@pytest.fixture
def fsdp_args(tiny_model, data_overrides, run_overrides):
    def fsdp_args(out: Path, shards: Path, name: str, steps: int) -> list[str]:
        return [
            *tiny_model,
            *data_overrides(shards),
            *run_overrides(out, steps, 2),
            *PROBE,
            f"run_name={name}",
            "strategy=fsdp",
            "trainer.devices=2",
            "optimizer.lr=1e-3",
            "objective=flow",
            "module.ema_objective_modules=true",
        ]

    return fsdp_args


@pytest.mark.slow
def test_fsdp2_shards_the_head_and_resumes_it_exactly(
    tmp_path, fsdp_args, write_synthetic_shards, run_train, torchrun_cmd
):
    """4 steps straight == 2 steps, a new pair of processes, 2 more: weights, EMA, head, head EMA
    and optimizer moments equal bit for bit (every draw is a function of seed, step and rank)."""
    from torch.distributed.checkpoint import FileSystemReader

    shards = write_synthetic_shards(tmp_path / "shards")
    out = tmp_path / "runs"
    run_train(cmd=torchrun_cmd(2, *fsdp_args(out, shards, "straight", 4)), timeout=300)
    run_train(cmd=torchrun_cmd(2, *fsdp_args(out, shards, "resumed", 2)), timeout=300)
    run_train(cmd=torchrun_cmd(2, *fsdp_args(out, shards, "resumed", 4)), timeout=300)

    folder = out / "straight/checkpoints/last.ckpt"
    chunks = FileSystemReader(str(folder)).read_metadata().state_dict_metadata
    head = chunks["state_dict.objective_modules.probe.head.weight"]
    assert len(head.chunks) == 2  # one shard per rank: FSDP2 sharded the head
    straight = torch.load(consolidate_checkpoint(folder), weights_only=True)
    resumed = torch.load(
        consolidate_checkpoint(out / "resumed/checkpoints/last.ckpt"), weights_only=True
    )
    assert straight["global_step"] == resumed["global_step"] == 4
    keys = straight["state_dict"].keys()
    assert {"objective_modules.probe.head.weight", "ema_objective.probe.head.weight"} <= set(keys)
    for key in keys:
        assert torch.equal(straight["state_dict"][key], resumed["state_dict"][key]), key
    moments_a = straight["optimizer_states"][0]["state"]
    moments_b = resumed["optimizer_states"][0]["state"]
    assert moments_a.keys() == moments_b.keys()
    for i in moments_a:
        for moment in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(moments_a[i][moment], moments_b[i][moment]), (i, moment)
