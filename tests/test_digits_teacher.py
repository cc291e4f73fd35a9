"""The CPU demonstration's teacher (encoder=digits_vit): built on first use, deterministic, cached,
and on the quickstart DiT's 4 x 4 token grid, so alignment=repa binds to the quickstart model."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from ditkit.training import digits_teacher

# One intra-op thread for every test here (the shared `one_thread` fixture).
pytestmark = pytest.mark.usefixtures("one_thread")


def test_built_deterministically_cached_and_on_the_quickstart_grid(tmp_path, monkeypatch):
    a = digits_teacher.digits_encoder(str(tmp_path / "a"), steps=3, progress=False)
    digits_teacher.digits_encoder(str(tmp_path / "b"), steps=3, progress=False)
    wa = load_file(str(tmp_path / "a" / "model.safetensors"))
    wb = load_file(str(tmp_path / "b" / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert (a.grid, a.dim, a.resolution) == (4, 64, 16)

    def no_rebuild(*args, **kwargs):
        raise AssertionError("the cached teacher was trained again")

    monkeypatch.setattr(digits_teacher, "build_digits_teacher", no_rebuild)
    cached = digits_teacher.digits_encoder(str(tmp_path / "a"))
    image = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    assert torch.equal(cached(image).patches, a(image).patches)


def test_repa_on_the_quickstart_composes_and_binds(tmp_path):
    from pathlib import Path

    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    conf = Path(__file__).resolve().parents[1] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose(
            config_name="train",
            overrides=[
                "experiment=quickstart",
                "encoder=digits_vit",
                "encoder.steps=3",
                f"paths.data_dir={tmp_path}",
                "alignment=repa",
                "alignment.depth=2",
            ],
        )
    assert cfg.data.images
    model, objective = instantiate(cfg.model), instantiate(cfg.objective)
    objective.bind(model)  # the teacher's 4x4 grid is the quickstart DiT's (16 px, patch 4)
    term = objective.terms["repa"]
    assert term.grid == term.encoder.grid == 4 and term.depths == (2,)
