"""Two EMA rates at once (module.extra_ema; JiT keeps 0.9999 and 0.9996): each equals the
hand-written average, both travel in the checkpoint, and read_checkpoint / evaluate.py `ema=NAME`
picks one."""

import copy
from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from torch.utils.data import DataLoader

from ditkit.checkpoints import read_checkpoint
from ditkit.objectives import RectifiedFlow
from ditkit.training import DiffusionModule, update_ema
from ditkit.training.module import step_seed

CONF = Path(__file__).resolve().parents[1] / "conf"
ADAMW = partial(
    torch.optim.AdamW, lr=1e-3, betas=(0.9, 0.999), weight_decay=0.0, eps=1e-8, fused=True
)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_dit, tiny_batches):
    """3 steps with ema_decay 0.9 and extra_ema {fast: 0.5}, saved to last.ckpt."""
    reference = tiny_dit()
    module = DiffusionModule(
        copy.deepcopy(reference),
        RectifiedFlow(),
        optimizer=ADAMW,
        ema_decay=0.9,
        extra_ema={"fast": 0.5},
        run_config={"model": {}, "objective": {}, "data": {}},
    )
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=3,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(module, DataLoader(tiny_batches(), batch_size=4))
    path = tmp_path_factory.mktemp("ckpt") / "last.ckpt"
    trainer.save_checkpoint(path)
    return reference, module, path


def test_each_ema_is_its_own_average(trained, tiny_batches):
    reference, module, _ = trained
    slow = copy.deepcopy(reference).requires_grad_(False)
    fast = copy.deepcopy(reference).requires_grad_(False)
    opt = ADAMW(reference.parameters())
    objective = RectifiedFlow()
    for step, batch in zip(range(3), DataLoader(tiny_batches(), batch_size=4)):
        torch.manual_seed(step_seed(0, step, 0, 0))
        loss = objective.training_losses(reference, batch)["loss"].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        update_ema(list(slow.parameters()), list(reference.parameters()), 0.9)
        update_ema(list(fast.parameters()), list(reference.parameters()), 0.5)
    for mine, want in ((module.ema, slow), (module.extra_ema["fast"], fast)):
        for (name, p), q in zip(want.named_parameters(), mine.parameters()):
            assert torch.equal(p, q), name
    # The two rates really differ: after 3 steps their weights do.
    a, b = module.ema.final_layer.linear.weight, module.extra_ema["fast"].final_layer.linear.weight
    assert not torch.equal(a, b)
    assert all(not p.requires_grad for p in module.extra_ema.parameters())
    assert len(module.named_trainable_parameters()) == len(list(module.model.parameters()))


def test_checkpoint_round_trip_and_ema_by_name(trained, tiny_dit):
    _, module, path = trained
    fast = read_checkpoint(path, "ema", "fast").state_dict
    main = read_checkpoint(path).state_dict
    for name, p in module.extra_ema["fast"].state_dict().items():
        assert torch.equal(fast[name], p), name
    for name, p in module.ema.state_dict().items():
        assert torch.equal(main[name], p), name
    # A fresh module built with the same extra_ema loads the file strictly, both EMAs included.
    fresh = DiffusionModule(tiny_dit(), RectifiedFlow(), extra_ema={"fast": 0.5})
    fresh.load_state_dict(torch.load(path, weights_only=True)["state_dict"], strict=True)
    for p, q in zip(fresh.extra_ema["fast"].parameters(), module.extra_ema["fast"].parameters()):
        assert torch.equal(p, q)
    with pytest.raises(ValueError, match="ema=slow: .* no such EMA; choose ema=ema or ema=fast"):
        read_checkpoint(path, "ema", "slow")
    with pytest.raises(ValueError, match="drop weights=raw"):
        read_checkpoint(path, "raw", "fast")


def test_bad_extra_ema_is_refused(tiny_dit):
    with pytest.raises(ValueError, match=r"extra_ema.fast must lie in \[0, 1\)"):
        DiffusionModule(tiny_dit(), RectifiedFlow(), extra_ema={"fast": 1.0})
    with pytest.raises(ValueError, match="identifier other than ema"):
        DiffusionModule(tiny_dit(), RectifiedFlow(), extra_ema={"ema": 0.5})


def test_configs_carry_the_keys():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        train = compose(
            "train", overrides=["+module.extra_ema.ema_9996=0.9996"], return_hydra_config=True
        )
        evaluate = compose("evaluate", overrides=["ckpt=x", "ema=ema_9996"])
    assert dict(train.module.extra_ema) == {"ema_9996": 0.9996}
    assert evaluate.ema == "ema_9996"
