"""DiffusionModule in one process: the step equals a hand-written loop (per-step seeds, AdamW, clipping,
EMA), EMA arithmetic, warm-up, NaN skipping, MFU table."""

import copy
import math
from functools import partial

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from ditkit.objectives import GaussianDiffusion, RectifiedFlow
from ditkit.training import DiffusionModule, NonFiniteLossError, ema_decay, peak_flops, update_ema
from ditkit.training.module import step_seed
from ditkit.training.schedules import lr_schedule


@pytest.fixture(autouse=True)
def one_thread():
    """2 shared cores: one intra-op thread is several times faster than two fighting for them."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def adamw(lr: float):
    """conf/optimizer/adamw.yaml's optimizer at another lr (DiT's settings: no weight decay)."""
    return partial(
        torch.optim.AdamW, lr=lr, betas=(0.9, 0.999), weight_decay=0.0, eps=1e-8, fused=True
    )


def fit(module, steps: int, data, batch_size: int = 4, **trainer_kwargs) -> L.Trainer:
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        **trainer_kwargs,
    )
    trainer.fit(module, DataLoader(data, batch_size=batch_size))
    return trainer


def test_update_ema_is_one_lerp_with_fp32_shadow():
    ema = [torch.tensor([1.0, 2.0]), torch.tensor([[0.0]])]
    params = [torch.tensor([3.0, 6.0], dtype=torch.bfloat16), torch.tensor([[4.0]])]
    update_ema(ema, params, decay=0.75)
    assert torch.equal(ema[0], torch.tensor([1.5, 3.0]))  # 0.75 * e + 0.25 * p
    assert torch.equal(ema[1], torch.tensor([[1.0]]))
    assert ema[0].dtype == torch.float32


def test_ema_warmup_schedule():
    assert ema_decay(0.9999, 0, warmup=False) == 0.9999
    assert ema_decay(0.9999, 0, warmup=True) == pytest.approx(0.1)  # (1 + 0) / (10 + 0)
    assert ema_decay(0.9999, 90, warmup=True) == pytest.approx(0.91)
    assert ema_decay(0.99, 10**6, warmup=True) == 0.99  # capped at the decay


def test_step_seed_depends_on_every_coordinate():
    base = step_seed(0, 5, 0, 0)
    assert base == step_seed(0, 5, 0, 0) and 0 <= base < 2**63
    others = {
        step_seed(1, 5, 0, 0),
        step_seed(0, 6, 0, 0),
        step_seed(0, 5, 1, 0),
        step_seed(0, 5, 0, 1),
    }
    assert base not in others and len(others) == 4


@pytest.mark.parametrize("objective", [GaussianDiffusion(), RectifiedFlow()], ids=["ddpm", "flow"])
def test_steps_equal_a_hand_written_loop(objective, tiny_dit, tiny_batches):
    """Lightning + DiffusionModule == seed(seed, step) / loss / backward / AdamW / EMA written out by hand,
    bit for bit; so the per-step seeding contract and the EMA update are exactly what they claim."""
    steps, seed, decay = 5, 7, 0.9
    reference = tiny_dit()
    module = DiffusionModule(
        copy.deepcopy(reference), objective, optimizer=adamw(1e-3), ema_decay=decay, seed=seed
    )
    fit(module, steps, tiny_batches())

    ema = copy.deepcopy(reference).requires_grad_(False)
    opt = torch.optim.AdamW(
        reference.parameters(), lr=1e-3, betas=(0.9, 0.999), weight_decay=0.0, eps=1e-8, fused=True
    )
    for step, batch in zip(range(steps), DataLoader(tiny_batches(), batch_size=4)):
        torch.manual_seed(step_seed(seed, step, 0, 0))
        loss = objective.training_losses(reference, batch)["loss"].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        update_ema(list(ema.parameters()), list(reference.parameters()), decay)

    for (name, p), q in zip(reference.named_parameters(), module.model.parameters()):
        assert torch.equal(p, q), name
    for p, q in zip(ema.parameters(), module.ema.parameters()):
        assert torch.equal(p, q)
    assert module.ema_updates.item() == steps and module.skipped_steps.item() == 0


def test_clipping_uses_the_global_norm_and_warmup_scales_lr(tiny_dit, tiny_batches):
    """gradient_clip_val clips like torch.nn.utils.clip_grad_norm_; warmup_steps=W gives lr * (s + 1) / W."""
    objective, steps, clip, warmup = GaussianDiffusion(), 3, 0.05, 4
    reference = tiny_dit()
    module = DiffusionModule(
        copy.deepcopy(reference),
        objective,
        optimizer=adamw(1e-3),
        lr_schedule=partial(lr_schedule, kind="warmup", warmup_steps=warmup),
    )
    trainer = fit(module, steps, tiny_batches(), gradient_clip_val=clip)

    opt = adamw(1e-3)(reference.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    norms = []
    for step, batch in zip(range(steps), DataLoader(tiny_batches(), batch_size=4)):
        torch.manual_seed(step_seed(0, step, 0, 0))
        loss = objective.training_losses(reference, batch)["loss"].mean()
        opt.zero_grad()
        loss.backward()
        norms.append(torch.nn.utils.clip_grad_norm_(reference.parameters(), clip).item())
        opt.step()
        sched.step()
    assert min(norms) > clip  # the clip was active at every step
    for p, q in zip(reference.parameters(), module.model.parameters()):
        torch.testing.assert_close(
            p, q, rtol=1e-4, atol=2e-5
        )  # the norm is summed in another order
    assert trainer.callback_metrics["train/grad_norm"].item() == pytest.approx(norms[-1], rel=1e-5)
    assert trainer.callback_metrics["train/lr"].item() == pytest.approx(1e-3 * 3 / warmup)


class NaNAt(torch.nn.Module):
    """Wraps a model; its output is NaN at the optimizer steps listed in `bad` (counting forward calls)."""

    def __init__(self, model, bad):
        super().__init__()
        self.inner, self.bad, self.calls = model, set(bad), 0
        # The Backbone contract, passed through.
        self.blocks, self.num_classes = model.blocks, model.num_classes
        self.in_channels, self.input_size = model.in_channels, model.input_size
        self.condition_keys, self.learn_sigma = model.condition_keys, model.learn_sigma
        self.null_condition, self.forward_flops = model.null_condition, model.forward_flops

    def forward(self, x, t, y):
        out = self.inner(x, t, y)
        step, self.calls = self.calls, self.calls + 1
        return out * float("nan") if step in self.bad else out


def _snapshot(module):
    return [p.detach().clone() for p in module.model.parameters()], [
        p.clone() for p in module.ema.parameters()
    ]


def test_nan_step_is_skipped_and_counted_weights_and_ema_unchanged(tiny_dit, tiny_batches):
    module = DiffusionModule(
        NaNAt(tiny_dit(), bad={2}), GaussianDiffusion(), optimizer=adamw(1e-3), ema_decay=0.5
    )
    states = []

    class Snap(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            states.append(_snapshot(pl_module))

    fit(module, 4, tiny_batches(), callbacks=[Snap()])
    (w1, e1), (w2, e2), (w3, _) = states[1], states[2], states[3]
    assert all(torch.equal(a, b) for a, b in zip(w1, w2))  # step 2 changed nothing
    assert all(torch.equal(a, b) for a, b in zip(e1, e2))
    assert not all(torch.equal(a, b) for a, b in zip(w2, w3))  # step 3 trained again
    assert module.skipped_steps.item() == 1 and module.ema_updates.item() == 3
    # AdamW never saw the NaN step: its step count is the number of taken steps.
    opt_state = next(iter(module.trainer.optimizers[0].state.values()))
    assert opt_state["step"].item() == 3


def test_too_many_nan_steps_in_a_row_stop_with_a_clear_error(tmp_path, tiny_dit, tiny_batches):
    from ditkit.checkpoints import AtomicModelCheckpoint

    module = DiffusionModule(
        NaNAt(tiny_dit(), bad={3, 4, 5}), GaussianDiffusion(), max_consecutive_skips=3
    )
    saver = AtomicModelCheckpoint(
        dirpath=tmp_path, every_n_train_steps=1, save_top_k=0, save_last=True
    )
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=20,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[saver],
    )
    with pytest.raises(
        NonFiniteLossError, match=r"3 optimizer steps in a row .* lower optimizer.lr"
    ):
        trainer.fit(module, DataLoader(tiny_batches(), batch_size=4))
    ckpt = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 5  # saved after the last skipped step before the fatal one...
    assert (
        ckpt["state_dict"]["ema_updates"].item() == 3
    )  # ...holding the weights of the 3 good steps
    assert all(
        torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point()
    )


def test_peak_flops_table():
    assert peak_flops("NVIDIA H100 80GB HBM3", "bf16-mixed") == 989e12
    assert peak_flops("NVIDIA H100 PCIe", "bf16-mixed") == 756e12
    assert peak_flops("NVIDIA A100-SXM4-80GB", "16-mixed") == 312e12
    assert peak_flops("NVIDIA H200", "bf16-true") == 989e12
    assert peak_flops("NVIDIA A100-SXM4-80GB", "32-true") is None  # no fp32 MFU
    assert peak_flops("Some Future GPU", "bf16-mixed") is None


def test_ema_stays_fp32_under_bf16_true(tiny_dit, tiny_batches):
    module = DiffusionModule(tiny_dit(), RectifiedFlow(), ema_decay=0.5)
    fit(module, 2, tiny_batches(), precision="bf16-true")
    assert next(module.model.parameters()).dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in module.ema.parameters())
    assert module.ema_updates.item() == 2


def test_compile_switch_compiles_every_block_in_place(tiny_dit):
    module = DiffusionModule(tiny_dit(), RectifiedFlow(), compile=True)
    keys = set(module.state_dict())
    module.configure_model()
    assert all(
        hasattr(block.forward, "_torchdynamo_orig_callable") for block in module.model.blocks
    )
    assert not any(
        hasattr(block.forward, "_torchdynamo_orig_callable") for block in module.ema.blocks
    )
    assert (
        set(module.state_dict()) == keys
    )  # checkpoints of compiled and eager runs are interchangeable


def test_throughput_and_mfu_arithmetic(monkeypatch, tiny_dit):
    from types import SimpleNamespace

    from ditkit.training import Throughput
    from ditkit.training import throughput as tp

    clock = iter([100.0, 102.0, 102.0])  # 2 s from the end of the first step to the end of step 3
    monkeypatch.setattr(tp.time, "perf_counter", lambda: next(clock))
    logged = {}
    model = tiny_dit()
    pl_module = SimpleNamespace(
        model=model, device=torch.device("cpu"), log_dict=lambda m, **k: logged.update(m)
    )
    trainer = SimpleNamespace(
        precision="bf16-mixed", accumulate_grad_batches=1, world_size=2, global_step=1
    )
    callback = Throughput(log_every_n_steps=3)
    callback.on_train_start(trainer, pl_module)
    callback._peak = 1e12  # as if on a GPU with a 1 TFLOP/s peak
    batch = {"x": torch.zeros(8, 4, 8, 8), "y": torch.zeros(8)}
    for step in (1, 2, 3):
        trainer.global_step = step
        callback.on_train_batch_end(trainer, pl_module, None, batch, step - 1)
    # steps 2 and 3 after the first: 2 x 8 images per rank x 2 ranks in 2 s
    assert logged["perf/imgs_per_sec"] == 16.0
    assert logged["perf/mfu"] == pytest.approx(16.0 * 3 * model.forward_flops(1) / (1e12 * 2))


def test_optimizer_and_lr_schedule_groups_build_from_their_configs(tiny_dit, tiny_batches):
    """optimizer=muon: Muon takes the 2-D weights inside the blocks, AdamW the rest, one optimizer
    with one lr per group logged; lr_schedule=cosine: warm-up, then the cosine to the final lr."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    conf = __import__("pathlib").Path(__file__).resolve().parents[1] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose(
            overrides=[
                "+optimizer=muon",
                "+lr_schedule=cosine",
                "+trainer.max_steps=4",
                "lr_schedule.warmup_steps=2",
            ]
        )
    module = DiffusionModule(
        tiny_dit(),
        RectifiedFlow(),
        optimizer=instantiate(cfg.optimizer, _convert_="all"),
        lr_schedule=instantiate(cfg.lr_schedule, _convert_="all"),
    )
    trainer = fit(module, 4, tiny_batches())
    muon, adamw = trainer.optimizers[0].param_groups
    assert (muon["algorithm"], adamw["algorithm"]) == ("muon", "adamw")
    assert all(n.startswith("model.blocks.") for n in muon["param_names"])
    assert "model.blocks.0.attn.qkv.weight" in muon["param_names"]
    assert "model.blocks.0.attn.qkv.bias" in adamw["param_names"]
    assert "model.final_layer.linear.weight" in adamw["param_names"]
    # step 3 of 4 (0-based), warm-up 2: p = (3 - 2) / (4 - 2) = 0.5, factor (1 + cos(pi/2)) / 2
    factor = 0.5 * (1 + math.cos(math.pi * 0.5))
    assert trainer.callback_metrics["train/lr_muon"].item() == pytest.approx(1e-4 * factor)
    assert trainer.callback_metrics["train/lr_adamw"].item() == pytest.approx(1e-4 * factor)


def test_lr_factors_in_closed_form():
    from ditkit.training.schedules import lr_factor

    assert [lr_factor(s, "warmup", 4) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert lr_factor(0, "constant") == 1.0 and lr_factor(10**6, "constant") == 1.0
    # cosine over steps 10..110 to 0.1: halfway (s = 60) the factor is 0.1 + 0.9 / 2
    assert lr_factor(60, "cosine", 10, 110, 0.1) == pytest.approx(0.55)
    assert lr_factor(110, "cosine", 10, 110, 0.1) == pytest.approx(0.1)
    assert lr_factor(500, "cosine", 10, 110, 0.1) == pytest.approx(0.1)  # held after the end
    assert lr_factor(35, "linear_decay", 10, 110, 0.0) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="lr_schedule=constant|warmup|cosine|linear_decay"):
        lr_schedule(None, kind="step")
    with pytest.raises(ValueError, match="must exceed lr_schedule.warmup_steps=100"):
        lr_schedule(None, kind="cosine", warmup_steps=100, total_steps=50)
