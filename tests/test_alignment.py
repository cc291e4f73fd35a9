"""REPA and iREPA alignment terms (ditkit.objectives.alignment): values equal a hand computation on
fixed tensors, both objectives add them as their own loss part without changing the denoising
loss, alignment off trains bit for bit as before, a projector that can reach the teacher drives the
cosine loss to -1, bad set-ups fail before training, and 2-process FSDP2 resumes exactly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from ditkit.data.format import FORMAT, MANIFEST, VERSION, encode_sample, shard_name
from ditkit.models.encoders import FrozenEncoder
from ditkit.objectives import IREPA, REPA, GaussianDiffusion, RectifiedFlow
from ditkit.objectives.terms import TermInputs, capture_block_outputs

# One intra-op thread for every test here (the shared `one_thread` fixture).
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, save_tiny_encoder) -> str:
    """A tiny random DINOv2 (8 px, patch 2: a 4x4 grid, the tiny DiT's; 16 wide), saved."""
    return save_tiny_encoder("dinov2", tmp_path_factory.mktemp("teacher") / "dinov2")


@pytest.fixture(scope="module")
def teacher(teacher_dir) -> FrozenEncoder:
    return FrozenEncoder("dinov2_b", pretrained=teacher_dir, resolution=8)


def batch(n: int = 4) -> dict:
    """{"x", "y", "image"}: the tiny DiT's latents and labels, 8 px uint8 images."""
    g = torch.Generator().manual_seed(1)
    image = torch.randint(0, 256, (n, 3, 8, 8), generator=g, dtype=torch.uint8)
    return {
        "x": torch.randn(n, 4, 8, 8, generator=g),
        "y": torch.randint(0, 10, (n,), generator=g),
        "image": image,
    }


def hand_cosine_loss(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """(N, T, E) x 2 -> (N,): - mean_T <p, z> / (|p| |z|)."""
    cos = (pred * target).sum(-1) / (
        np.linalg.norm(pred, axis=-1) * np.linalg.norm(target, axis=-1)
    )
    return -cos.mean(1)


def test_repa_value_is_the_hand_computed_negative_patch_cosine(tiny_dit, teacher):
    """float64: the MLP by explicit matmuls and SiLU, the teacher = the library's DINOv2 forward
    without the class token, the cosine by dot products and norms."""
    model = tiny_dit()
    term = REPA(teacher, depth=1, weight=0.5, projector_dim=8)
    term.bind(model)
    term.double()
    b = batch()
    hidden = torch.randn(4, 16, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    value = term(TermInputs(model, b, b["x"], torch.zeros(4), b["x"], {1: hidden}))

    w = [p.detach().numpy() for p in term.projector.parameters()]
    silu = lambda a: a / (1 + np.exp(-a))  # noqa: E731
    h = hidden.numpy()
    p = silu(silu(h @ w[0].T + w[1]) @ w[2].T + w[3]) @ w[4].T + w[5]
    with torch.no_grad():
        z = teacher.net(pixel_values=teacher.preprocess(b["image"])).last_hidden_state[:, 1:]
    want = hand_cosine_loss(p, z.double().numpy())
    np.testing.assert_allclose(value.detach().numpy(), want, rtol=0, atol=1e-12)
    assert -1 <= want.min() and want.max() <= 1


def test_irepa_value_is_the_hand_computed_conv_and_spatially_normalised_teacher(tiny_dit, teacher):
    """float64: the 3x3 'same' convolution as a sum over the padded neighbourhood, the teacher's
    (z - 0.6 mean_T z) / (std_T z + 1e-6) over the 16 patches, the negative patch cosine."""
    model = tiny_dit()
    term = IREPA(teacher, depth=2, weight=0.5, kernel_size=3, gamma=0.6)
    term.bind(model)
    term.double()
    b = batch()
    hidden = torch.randn(4, 16, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    value = term(TermInputs(model, b, b["x"], torch.zeros(4), b["x"], {2: hidden}))

    weight = term.projector.weight.detach().numpy()  # (E, D, 3, 3)
    bias = term.projector.bias.detach().numpy()
    grid = np.pad(hidden.numpy().reshape(4, 4, 4, 32), ((0, 0), (1, 1), (1, 1), (0, 0)))
    p = np.zeros((4, 4, 4, 16)) + bias
    for i in range(4):
        for j in range(4):
            patch = grid[:, i : i + 3, j : j + 3]  # (N, 3, 3, D)
            p[:, i, j] += np.einsum("nabd,edab->ne", patch, weight)
    with torch.no_grad():
        z = teacher.net(pixel_values=teacher.preprocess(b["image"])).last_hidden_state[:, 1:]
    z = z.double().numpy()
    z = z - 0.6 * z.mean(1, keepdims=True)
    z = z / (z.std(1, ddof=1, keepdims=True) + 1e-6)
    want = hand_cosine_loss(p.reshape(4, 16, 16), z)
    # The teacher is normalised in float32 inside the term (1e-6 relative) before the float64 rest.
    np.testing.assert_allclose(value.detach().numpy(), want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("objective", [RectifiedFlow, GaussianDiffusion])
def test_both_objectives_add_the_term_as_its_own_part_and_keep_their_loss(
    tiny_dit, teacher, objective
):
    """loss = denoising + 0.5 x repa, repa equals the term on the block output our own hook saw,
    and the denoising part equals the objective without alignment bit for bit (same draws)."""
    model = tiny_dit()
    term = REPA(teacher, depth=1, weight=0.5, projector_dim=8)
    aligned, plain = objective(terms={"repa": term}), objective()
    aligned.bind(model)
    b = batch()
    torch.manual_seed(0)
    with capture_block_outputs(model, (1,)) as seen:
        losses = aligned.training_losses(model, b)
    torch.manual_seed(0)
    reference = plain.training_losses(model, {"x": b["x"], "y": b["y"]})
    assert torch.equal(losses["mse"], reference["mse"])
    # loss - 0.5 repa undoes one float32 addition: within an ulp of the reference loss.
    torch.testing.assert_close(losses["loss"] - 0.5 * losses["repa"], reference["loss"])
    inputs = TermInputs(model, b, b["x"], torch.zeros(4), b["x"], {1: seen[1]})
    assert torch.equal(losses["repa"], term(inputs))


def test_a_projector_that_can_reach_the_teacher_drives_the_loss_to_minus_one(teacher, tiny_dit):
    """Hidden tokens that are a linear image of the teacher's features: the MLP can invert it, so
    training the projector alone takes the cosine loss from ~0 to -1."""
    model = tiny_dit()
    term = REPA(teacher, depth=1, weight=0.5, projector_dim=64)
    term.bind(model)
    b = batch(8)
    g = torch.Generator().manual_seed(0)
    z = term.teacher(b)  # (8, 16, 16)
    hidden = z @ torch.randn(16, 32, generator=g)  # (8, 16, 32), rank 16: invertible on its range
    inputs = TermInputs(model, b, b["x"], torch.zeros(8), b["x"], {1: hidden})
    opt = torch.optim.Adam(term.parameters(), lr=3e-3)
    first = term(inputs).mean().item()
    for _ in range(300):
        loss = term(inputs).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert abs(first) < 0.5
    assert loss.item() < -0.99


def test_repa_refuses_a_missing_encoder_a_missing_image_and_a_grid_it_cannot_match(
    tiny_dit, teacher, teacher_dir
):
    with pytest.raises(ValueError, match="encoder=dinov2_b"):
        REPA(None)
    term = REPA(teacher, depth=1, projector_dim=8)
    term.bind(tiny_dit())
    b = batch()
    del b["image"]
    with pytest.raises(KeyError, match="keep_images=true"):
        term.teacher(b)
    grid3 = FrozenEncoder("dinov2_b", pretrained=teacher_dir, resolution=6)  # 3x3 vs the DiT's 4x4
    with pytest.raises(ValueError, match=r"3x3 token grid.*4x4 grid"):
        REPA(grid3, depth=1).bind(tiny_dit())


# --- train.py: configs, early failures, FSDP2 exact resume ----------------------------------------


def write_image_shards(root: Path, num_samples: int = 64, num_shards: int = 4) -> Path:
    """Random 8x8x4 moments with 8 px uint8 images beside them (format version 2)."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    per = num_samples // num_shards
    shards = []
    for s in range(num_shards):
        with wds.TarWriter(str(root / shard_name(s)), encoder=False) as tar:
            for i in range(per):
                mean = rng.standard_normal((4, 8, 8)).astype(np.float16)
                moments = np.concatenate([mean, np.full_like(mean, -6.0)])
                flip = np.concatenate([mean[..., ::-1], np.full_like(mean, -6.0)])
                image = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
                label = int(rng.integers(10))
                tar.write(encode_sample(f"s{s}_{i:04d}", label, moments, flip, image))
        shards.append({"name": shard_name(s), "num_samples": per})
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "num_samples": per * num_shards,
        "num_shards": num_shards,
        "shards": shards,
        "latent_shape": [4, 8, 8],
        "dtype": "float16",
        "vae": {"name": "identity", "scale_factor": 1.0, "latent_channels": 4, "downsample": 1},
        "image_size": 8,
        "crop": "adm_center",
        "images": {"field": "image.png", "size": 8, "dtype": "uint8", "crop": "adm_center"},
        "num_classes": 10,
        "classes": None,
        "source": {"type": "synthetic"},
    }
    (root / MANIFEST).write_text(json.dumps(manifest))
    return root


def encoder_args(teacher_dir: str, resolution: int = 8) -> list[str]:
    return [
        "encoder=dinov2_b",
        f"encoder.pretrained={teacher_dir}",
        f"encoder.resolution={resolution}",
    ]


def test_an_encoder_on_shards_without_images_fails_before_training(
    tmp_path,
    teacher_dir,
    tiny_model,
    write_synthetic_shards,
    data_overrides,
    run_overrides,
    run_train,
):
    shards = write_synthetic_shards(tmp_path / "shards")  # latents only
    proc = run_train(
        *tiny_model,
        *data_overrides(shards),
        *run_overrides(tmp_path / "runs", 2, 2),
        *encoder_args(teacher_dir),
        "alignment=repa",
        "alignment.depth=1",
        check=False,
    )
    assert proc.returncode != 0
    assert "keep_images=true" in proc.stderr
    assert not list((tmp_path / "runs").rglob("*.ckpt"))


def compose_train(*overrides: str):
    from hydra import compose, initialize_config_dir

    conf = Path(__file__).resolve().parents[1] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


def test_an_encoder_grid_the_backbone_cannot_match_fails_naming_both(teacher_dir, tiny_model):
    """Composed as train.py does; the module (built before any training) refuses the grids."""
    from hydra.utils import instantiate

    from ditkit.training import DiffusionModule

    cfg = compose_train(
        *tiny_model,
        "data.latent_size=8",
        "data.latent_channels=4",
        "data.num_classes=10",
        *encoder_args(teacher_dir, resolution=6),  # 3x3 patches; the DiT has 4x4
        "alignment=repa",
        "alignment.depth=1",
    )
    assert cfg.data.images  # the encoder asks the loader for the images
    with pytest.raises(ValueError, match=r"3x3 token grid.*4x4 grid"):
        DiffusionModule(instantiate(cfg.model), instantiate(cfg.objective))


def fit(module, data, steps: int = 3):
    import lightning as L
    from torch.utils.data import DataLoader

    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(module, DataLoader(data, batch_size=4))
    state = {k: v.detach().clone() for k, v in module.model.state_dict().items()}
    return state, trainer.callback_metrics


def test_alignment_off_trains_bit_for_bit_as_before(tiny_dit, teacher):
    """alignment=none encoder=none compose to today's config; an image field in the batches
    changes nothing; and REPA with weight 0 (hooks, teacher, projector all running) leaves the
    backbone's training bit for bit unchanged."""
    from functools import partial

    from ditkit.data import TensorDict
    from ditkit.training import DiffusionModule

    cfg = compose_train("objective=flow", "alignment=none", "encoder=none")
    assert cfg.objective.terms == {} and cfg.data.images is False
    assert cfg.objective == compose_train("objective=flow").objective
    b = batch(16)
    adamw = partial(torch.optim.AdamW, lr=1e-2, weight_decay=0.0, fused=True)
    today, _ = fit(
        DiffusionModule(tiny_dit(), RectifiedFlow(), optimizer=adamw),
        TensorDict({"x": b["x"], "y": b["y"]}),
    )
    with_images, _ = fit(
        DiffusionModule(tiny_dit(), RectifiedFlow(), optimizer=adamw), TensorDict(b)
    )
    term = REPA(teacher, depth=1, weight=0.0, projector_dim=8)
    zero_weight = DiffusionModule(tiny_dit(), RectifiedFlow(terms={"repa": term}), optimizer=adamw)
    aligned, metrics = fit(zero_weight, TensorDict(b))
    assert -1 <= metrics["train/repa"] <= 1  # the term ran and was logged
    for key in today:
        assert torch.equal(today[key], with_images[key]), key
        assert torch.equal(today[key], aligned[key]), key


def fsdp_repa_args(
    tiny_model, data_overrides, run_overrides, teacher_dir, out, shards, name, steps, alignment
):
    # REG's run as in tests/test_reg.py (its sampling state has no learned-variance half).
    reg = ["model.learn_sigma=false"] if alignment == "reg" else []
    return [
        *tiny_model,
        *data_overrides(shards),
        *run_overrides(out, steps, 2),
        *encoder_args(teacher_dir),
        f"alignment={alignment}",
        *reg,
        "alignment.depth=1",
        "alignment.projector_dim=16",
        f"run_name={name}",
        "strategy=fsdp",
        "trainer.devices=2",
        "optimizer.lr=1e-3",
        "objective=flow",
        "module.ema_objective_modules=true",
    ]


@pytest.mark.slow
@pytest.mark.parametrize("alignment", ["repa", "reg"])
def test_fsdp2_repa_resumes_exactly(
    tmp_path,
    teacher_dir,
    tiny_model,
    data_overrides,
    run_overrides,
    run_train,
    torchrun_cmd,
    alignment,
):
    """4 steps straight == 2 steps, new processes, 2 more: backbone, EMA, projector, projector EMA
    (and REG's token embedding and head) and optimizer moments bit for bit; the projector (and
    REG's head) is sharded; the alignment parts are logged."""
    from torch.distributed.checkpoint import FileSystemReader

    from ditkit.checkpoints import consolidate_checkpoint

    shards = write_image_shards(tmp_path / "shards")
    out = tmp_path / "runs"
    common = (tiny_model, data_overrides, run_overrides, teacher_dir, out, shards)
    for name, steps in (("straight", 4), ("resumed", 2), ("resumed", 4)):
        args = fsdp_repa_args(*common, name, steps, alignment)
        run_train(cmd=torchrun_cmd(2, *args), timeout=300)

    folder = out / "straight/checkpoints/last.ckpt"
    chunks = FileSystemReader(str(folder)).read_metadata().state_dict_metadata
    sharded = [f"objective_modules.{alignment}.projector.0.weight"]
    if alignment == "reg":
        sharded += ["objective_modules.reg.embed.0.weight", "objective_modules.reg.head.weight"]
    for key in sharded:
        assert len(chunks[f"state_dict.{key}"].chunks) == 2, key
    assert not any("encoder" in k for k in chunks)  # the frozen teacher is never saved
    straight = torch.load(consolidate_checkpoint(folder), weights_only=True)
    resumed = torch.load(
        consolidate_checkpoint(out / "resumed/checkpoints/last.ckpt"), weights_only=True
    )
    assert straight["global_step"] == resumed["global_step"] == 4
    keys = straight["state_dict"].keys()
    assert {
        f"objective_modules.{alignment}.projector.4.weight",
        f"ema_objective.{alignment}.projector.4.weight",
    } <= set(keys)
    if alignment == "reg":
        assert {"ema_objective.reg.embed.0.weight", "ema_objective.reg.head.weight"} <= set(keys)
    for key in keys:
        assert torch.equal(straight["state_dict"][key], resumed["state_dict"][key]), key
    a, b = straight["optimizer_states"][0]["state"], resumed["optimizer_states"][0]["state"]
    assert a.keys() == b.keys()
    for i in a:
        for moment in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(a[i][moment], b[i][moment]), (i, moment)
    header, *_ = (out / "straight/csv/version_0/metrics.csv").read_text().splitlines()
    parts = {"repa": {"train/repa"}, "reg": {"train/reg", "train/reg_cls"}}[alignment]
    assert parts <= set(header.split(","))


def test_the_papers_recipes():
    """REPA (Yu et al. 2025, sec. 4 / Table 2) and iREPA (Singh et al. 2025) on SiT-XL/2."""
    repa = compose_train("experiment=repa_sit_xl2_in256")
    assert (repa.model.variant, repa.model.patch_size, repa.model.learn_sigma) == ("XL", 2, False)
    assert repa.objective._target_.endswith("RectifiedFlow")
    assert repa.objective.time_sampling == "uniform"
    assert (repa.encoder.name, repa.encoder.resolution, repa.data.images) == ("dinov2_b", 224, True)
    term = repa.objective.terms.repa
    assert term._target_ == "ditkit.objectives.REPA" and term.encoder.name == "dinov2_b"
    assert (term.depth, term.weight, term.projector_dim) == (8, 0.5, 2048)
    assert (repa.optimizer.lr, repa.optimizer.weight_decay, repa.data.batch_size) == (1e-4, 0, 32)
    assert repa.trainer.max_steps == 4_000_000
    irepa = compose_train("experiment=irepa_sit_xl2_in256")
    assert list(irepa.objective.terms) == ["irepa"]
    term = irepa.objective.terms.irepa
    assert (term.depth, term.weight, term.kernel_size, term.gamma) == (8, 0.5, 3, 0.6)
    assert irepa.encoder.name == "dinov2_b" and irepa.trainer.max_steps == 400_000
