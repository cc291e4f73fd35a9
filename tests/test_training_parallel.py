"""DDP and FSDP2 with 2 gloo processes (torchrun), NaN on one rank only (RELIABILITY row 9), sharded
checkpoints consolidated and reloaded on 1 process, and resumed on another world size."""

from pathlib import Path

import pytest
import torch

from ditkit.checkpoints import consolidate_checkpoint
from ditkit.objectives import GaussianDiffusion
from ditkit.training import DiffusionModule

pytestmark = pytest.mark.slow
STEPS = 4


@pytest.fixture(scope="module")
def overrides(tiny_model, data_overrides, run_overrides):
    def overrides(
        out: Path, shards: Path, name: str, strategy: str, steps: int = STEPS
    ) -> list[str]:
        # a sample grid from the EMA copy every step: FSDP2 leaves a root gathered after a forward
        # without backward, and the next EMA update must still see shards
        run = [a for a in run_overrides(out, steps, 2) if a != "~callbacks.sample_grid"]
        return [
            *tiny_model,
            *data_overrides(shards),
            *run,
            f"run_name={name}",
            "callbacks.sample_grid.every_n_steps=1",
            "callbacks.sample_grid.num_images=2",
            "callbacks.sample_grid.sampler.steps=2",
            f"strategy={strategy}",
            "trainer.devices=2",
            "optimizer.lr=1e-3",
            "module.ema_decay=0.5",
            "+module.extra_ema.fast=0.25",  # a second EMA rate, sharded and saved like the first
            # rank 1 alone gets a NaN gradient at step 2 (after the DDP all-reduce): both ranks must
            # skip it (tests/train_callbacks.py: importable in train.py, whose PYTHONPATH has tests/)
            "+callbacks.nan._target_=train_callbacks.NaNGradOnRank",
            "+callbacks.nan.rank=1",
            "+callbacks.nan.step=2",
        ]

    return overrides


@pytest.fixture(scope="module")
def runs(tmp_path_factory, overrides, write_synthetic_shards, run_train, torchrun_cmd):
    shards = write_synthetic_shards(tmp_path_factory.mktemp("shards"))
    out = tmp_path_factory.mktemp("runs")
    for strategy in ("ddp", "fsdp"):
        run_train(cmd=torchrun_cmd(2, *overrides(out, shards, strategy, strategy)), timeout=300)
    return out, shards


def test_ddp_and_fsdp2_agree_and_skip_the_one_rank_nan_together(runs, tiny_dit):
    out, _ = runs
    ddp = torch.load(out / "ddp/checkpoints/last.ckpt", weights_only=True)
    folder = out / "fsdp/checkpoints/last.ckpt"
    assert folder.is_dir() and (folder / ".metadata").is_file()  # one shard file per rank
    assert len(list(folder.glob("*.distcp"))) == 2
    fsdp = torch.load(consolidate_checkpoint(folder), weights_only=True)

    for ckpt in (ddp, fsdp):
        assert ckpt["global_step"] == STEPS
        # Rank 0's gradients were finite at step 2: it skipped only because rank 1 told it to.
        assert ckpt["state_dict"]["skipped_steps"].item() == 1
        assert ckpt["state_dict"]["ema_updates"].item() == STEPS - 1
    assert ddp["state_dict"].keys() == fsdp["state_dict"].keys()
    # Same data, seeds and maths; all-reduce and reduce-scatter add the two ranks' gradients in other
    # orders (float32: ~1e-7 relative), which AdamW passes on at most 1:1 to 4 updates of lr 1e-3:
    # weight differences ~1e-9. A wrong average (a missing 1/world, a rank's gradient lost) moves
    # the weights by ~lr = 1e-3, far outside rtol 1e-4 / atol 1e-6.
    for key, value in ddp["state_dict"].items():
        torch.testing.assert_close(fsdp["state_dict"][key], value, rtol=1e-4, atol=1e-6, msg=key)
    for i, state in ddp["optimizer_states"][0]["state"].items():
        for moment in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(
                fsdp["optimizer_states"][0]["state"][i][moment], state[moment], rtol=1e-4, atol=1e-8
            )

    # The consolidated checkpoint loads strictly into a plain single-process module, EMA included.
    module = DiffusionModule(tiny_dit(), GaussianDiffusion(), extra_ema={"fast": 0.25})
    module.load_state_dict(fsdp["state_dict"], strict=True)
    for name, p in module.ema.named_parameters():
        assert torch.equal(p, fsdp["state_dict"][f"ema.{name}"])
        torch.testing.assert_close(p, ddp["state_dict"][f"ema.{name}"], rtol=1e-4, atol=1e-6)
    # The second EMA (decay 0.25) is its own average, sharded and saved like the first.
    fast = dict(module.extra_ema["fast"].named_parameters())
    assert fast.keys() == dict(module.ema.named_parameters()).keys()
    assert not torch.equal(fast["final_layer.linear.weight"], module.ema.final_layer.linear.weight)


def test_sharded_checkpoint_resumes_on_another_world_size(runs, overrides, run_train):
    """2 FSDP ranks -> 1 FSDP rank: torch.distributed.checkpoint reshards on load."""
    out, shards = runs
    args = [
        a
        for a in overrides(out, shards, "fsdp", "fsdp", steps=STEPS + 2)
        if a != "trainer.devices=2"
    ]
    run_train(*args, "trainer.devices=1", "ckpt_path=" + str(out / "fsdp/checkpoints/last.ckpt"))
    fsdp = torch.load(
        consolidate_checkpoint(out / "fsdp/checkpoints/last.ckpt", out / "after.ckpt"),
        weights_only=True,
    )
    assert fsdp["global_step"] == STEPS + 2
    assert fsdp["state_dict"]["ema_updates"].item() == STEPS + 1
