"""A real Lightning Trainer resumed from checkpoints sees exactly the batches of an uninterrupted run
(2 workers)."""

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from ditkit.data import LatentShardsDataModule


class Recorder(L.LightningModule):
    """Records the keys and latent sums of every training batch it gets."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen = []

    def training_step(self, batch, batch_idx):
        latents, labels, keys = batch["x"], batch["y"], batch["key"]
        self.seen.append((tuple(keys), labels.tolist(), latents.sum().item()))
        return (self.weight * latents.mean() - 1) ** 2

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.fixture
def fit(datamodule_kwargs):
    def fit(root, steps, checkpoint=None, ckpt_path=None):
        # 20 samples, 10 per epoch, batch 2: 5 batches an epoch, so 12 steps cross two epoch ends.
        datamodule = LatentShardsDataModule(
            **datamodule_kwargs(root, num_workers=2, samples_per_epoch=10)
        )
        module = Recorder()
        trainer = L.Trainer(
            max_steps=steps,
            accelerator="cpu",
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[checkpoint] if checkpoint else [],
            enable_checkpointing=checkpoint is not None,
            limit_val_batches=0,
        )
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
        return module.seen

    return fit


@pytest.mark.slow
def test_resumed_training_sees_the_same_batches_as_an_uninterrupted_run(
    tmp_path, fit, write_latent_shards
):
    root = tmp_path / "shards"
    write_latent_shards(root, (6, 5, 4, 3, 2))
    straight = fit(root, 12)
    assert len(straight) == 12 and len({b[0] for b in straight}) == 12
    # 1) stop after an epoch-end checkpoint (step 5: Lightning resumes it inside epoch 0),
    first = fit(
        root,
        6,
        ModelCheckpoint(
            tmp_path, "{step}", every_n_epochs=1, save_on_train_epoch_end=True, save_top_k=-1
        ),
    )
    # 2) resume it and save mid-epoch at step 8 (epoch 1, 3 batches in: worker 1's turn comes first),
    second = fit(
        root,
        8,
        ModelCheckpoint(tmp_path, "{step}", every_n_train_steps=8, save_top_k=-1),
        ckpt_path=tmp_path / "step=5.ckpt",
    )
    # 3) resume that and finish.
    third = fit(root, 12, ckpt_path=tmp_path / "step=8.ckpt")
    assert (
        torch.load(tmp_path / "step=5.ckpt", weights_only=True)["LatentShardsDataModule"]["batches"]
        == 5
    )
    state = torch.load(tmp_path / "step=8.ckpt", weights_only=True)["LatentShardsDataModule"]
    assert (state["epoch"], state["batches"]) == (1, 3)
    assert first[:5] + second + third == straight
