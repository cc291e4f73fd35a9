"""`model.pretrained=FOLDER`: training starts from a diffusers folder's weights, after a check that
names every size of the folder that does not fit the chosen model or the data."""

import pytest
import torch
from diffusers import DiTTransformer2DModel, SD3Transformer2DModel
from tiny_diffusers import DIFFUSERS_DIT, DIFFUSERS_SD3, randomize, share_first_embedder
from tiny_diffusers import MMDIT as TINY_MMDIT

from ditkit.checkpoints import from_diffusers, instantiate_model

SD3 = {**DIFFUSERS_SD3, "qk_norm": "rms_norm"}
MMDIT = {"_target_": "ditkit.models.MMDiT", **TINY_MMDIT, "pos_embed_base_size": 4, "qk_norm": True}
DIT = dict(
    _target_="ditkit.models.build_dit",
    variant="S",
    patch_size=2,
    depth=2,
    hidden_size=32,
    num_heads=2,
    input_size=8,
    in_channels=4,
    num_classes=1000,
    learn_sigma=True,
    timestep_freq_shift=1,
)


def _save(model, path):
    randomize(model)
    if isinstance(model, DiTTransformer2DModel):
        share_first_embedder(model)
    model.save_pretrained(path)
    return path


def _equal(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sorted(sa) == sorted(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_mmdit_starts_from_an_sd3_folder(tmp_path):
    folder = _save(SD3Transformer2DModel(**SD3), tmp_path / "sd3")
    model = instantiate_model({**MMDIT, "pretrained": str(folder)})
    assert _equal(model, from_diffusers(folder))
    # A smaller training grid than the table is fine: the table is cropped.
    assert _equal(
        instantiate_model({**MMDIT, "input_size": 4, "pretrained": str(folder)}),
        from_diffusers(folder),
    )


def test_mmdit_misfits_are_named(tmp_path):
    folder = _save(SD3Transformer2DModel(**SD3), tmp_path / "sd3")
    bad = {**MMDIT, "context_dim": 16, "pooled_dim": 8, "pos_embed_base_size": None, "depth": 3}
    with pytest.raises(ValueError) as err:
        instantiate_model({**bad, "pretrained": str(folder)})
    message = str(err.value)
    for expected in (
        "data.context_dim: the folder has 12, the model 16",
        "data.pooled_dim: the folder has 6, the model 8",
        "model.pos_embed_base_size: the folder has 4, the model None",
        "model.depth: the folder has 2, the model 3",
    ):
        assert expected in message
    with pytest.raises(ValueError, match="choose model=mmdit_"):
        instantiate_model({**DIT, "pretrained": str(folder)})


def test_dit_starts_from_a_dit_folder_and_names_misfits(tmp_path):
    folder = _save(DiTTransformer2DModel(**DIFFUSERS_DIT), tmp_path / "dit")
    assert _equal(instantiate_model({**DIT, "pretrained": str(folder)}), from_diffusers(folder))
    with pytest.raises(ValueError) as err:
        instantiate_model(
            {**DIT, "num_classes": 10, "timestep_freq_shift": 0, "pretrained": str(folder)}
        )
    assert "model.num_classes (data.num_classes): the folder has 1000, the model 10" in str(
        err.value
    )
    assert "model.timestep_freq_shift: the folder has 1" in str(err.value)


@pytest.mark.slow
def test_train_py_starts_from_the_folder(
    tmp_path, write_synthetic_shards, data_overrides, run_overrides, run_train
):
    """End to end: train.py model=dit_s model.pretrained=FOLDER with lr 0, so the saved weights
    are exactly the folder's."""
    config = {**DIFFUSERS_DIT, "num_embeds_ada_norm": 10}
    folder = _save(DiTTransformer2DModel(**config), tmp_path / "dit")
    shards = write_synthetic_shards(tmp_path / "shards")
    run_train(
        "model=dit_s",
        "model.depth=2",
        "model.hidden_size=32",
        "model.num_heads=2",
        "model.timestep_freq_shift=1",
        f"model.pretrained={folder}",
        "optimizer.lr=0",
        "optimizer.fused=false",
        *data_overrides(shards),
        *run_overrides(tmp_path / "out", 1, 1),
    )
    (ckpt_path,) = (tmp_path / "out").glob("*/checkpoints/last.ckpt")
    state = torch.load(ckpt_path, weights_only=True)["state_dict"]
    expected = from_diffusers(folder).state_dict()
    for k, v in expected.items():
        assert torch.equal(state[f"model.{k}"], v), k
