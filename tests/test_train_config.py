"""train.py's configs: every experiment composes and fits its data, bad configs fail before any work
with a message that names the key and the fix (RELIABILITY row 13), run folders are named by the
overrides."""

import importlib.util
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from ditkit.training.checks import ConfigError, check_experiment_sizes, check_model_fits_data

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = [
    "quickstart",
    "dit_xl2_in256",
    "sit_xl2_in256",
    "lightningdit_xl1_in256",
    "repa_sit_xl2_in256",
    "irepa_sit_xl2_in256",
]


def composed(*overrides: str):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


def check(*overrides: str) -> None:
    cfg = composed(*overrides)
    check_model_fits_data(
        OmegaConf.to_container(cfg.model, resolve=True),
        OmegaConf.to_container(cfg.data, resolve=True),
    )


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiments_compose_and_fit_their_data(experiment):
    check(f"experiment={experiment}")


def test_experiment_recipes():
    dit = composed("experiment=dit_xl2_in256")
    assert (dit.model.variant, dit.model.patch_size, dit.model.learn_sigma) == ("XL", 2, True)
    assert dit.objective._target_ == "ditkit.objectives.GaussianDiffusion"
    assert (dit.optimizer.lr, dit.optimizer.weight_decay, dit.module.ema_decay) == (
        1e-4,
        0.0,
        0.9999,
    )
    assert dit.optimizer._target_ == "torch.optim.AdamW" and dit.optimizer.fused
    assert dit.lr_schedule.kind == "constant" and dit.lr_schedule.warmup_steps == 0
    assert dit.data.batch_size * 8 == 256 and dit.trainer.max_steps == 400_000
    sit = composed("experiment=sit_xl2_in256")
    assert (
        sit.objective._target_ == "ditkit.objectives.RectifiedFlow"
        and sit.objective.time_sampling == "uniform"
    )
    modern = composed("experiment=lightningdit_xl1_in256")
    assert (modern.model.norm, modern.model.mlp, modern.model.rope, modern.model.patch_size) == (
        "rmsnorm",
        "swiglu",
        True,
        1,
    )
    assert modern.objective.cosine_loss_weight == 1.0 and modern.trainer.gradient_clip_val == 1.0
    assert modern.trainer.strategy._target_ == "ditkit.training.parallel.FSDP2Strategy"
    quick = composed("experiment=quickstart")
    assert quick.trainer.accelerator == "cpu" and quick.data._target_.endswith(
        "LatentShardsDataModule"
    )
    assert quick.data.builtin == "digits" and quick.callbacks.digits_score.per_class == 20


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["model.patch_size=3"],
            r"model.patch_size=3 does not divide the latent size 32 .*use model.patch_size=1\|2\|4",
        ),
        (
            ["model.input_size=64"],
            r"model.input_size=64 but the data has latent_size=32.*Drop the model.input_size",
        ),
        (["model.in_channels=3"], r"model.in_channels=3 but the data has latent_channels=4"),
        (
            ["data=digits", "model.num_classes=1000"],
            r"model.num_classes=1000 but the data has num_classes=10",
        ),
        (
            ["model=dit_s", "model.num_heads=5"],
            r"model.hidden_size=384 is not divisible by model.num_heads=5",
        ),
        (["model.depth=abc"], r"model.depth='abc' must be an integer"),
    ],
)
def test_model_that_does_not_fit_the_data_is_refused_with_the_fix(overrides, message):
    with pytest.raises(ConfigError, match=message):
        check(*overrides)


def test_misspelt_key_is_refused_by_hydra():
    with pytest.raises(ConfigCompositionException, match="dpeth"):
        composed("model.dpeth=3")


def test_unknown_model_fails_in_seconds_listing_the_choices(run_train):
    start = time.time()
    proc = run_train("model=dit_xxl", check=False, timeout=120)
    assert proc.returncode != 0
    assert "Could not find 'model/dit_xxl'" in proc.stderr
    assert all(f"\t{name}\n" in proc.stderr for name in ("dit_s", "dit_b", "dit_l", "dit_xl"))
    assert "Seed set" not in proc.stdout + proc.stderr  # nothing was built
    print(f"train.py model=dit_xxl failed after {time.time() - start:.1f} s")


def test_patch_size_error_comes_from_train_py_before_building(tmp_path, run_train):
    proc = run_train(
        "data=digits",
        "model.patch_size=3",
        f"paths.output_dir={tmp_path}",
        "logger=csv",
        check=False,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "model.patch_size=3 does not divide the latent size 16" in proc.stderr
    assert (
        not list(tmp_path.glob("*/checkpoints"))
        and not (REPO / "data" / "digits16.building").exists()
    )


def test_shards_that_do_not_fit_fail_before_the_model_is_built(
    tmp_path, write_synthetic_shards, run_train
):
    """DiT-XL (seconds to build on a CPU) is never built: the manifest is read first. (Left unset,
    the sizes would be filled in from the manifest: tests/test_run_identity.py.)"""
    shards = write_synthetic_shards(tmp_path / "shards")  # 4 x 8 x 8 latents
    proc = run_train(
        "model=dit_xl",
        "data=imagenet_latents",
        f"data.root={shards}",
        "data.latent_size=32",
        "data.latent_channels=3",
        "logger=csv",
        f"paths.output_dir={tmp_path / 'out'}",
        check=False,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "The shards (latents [4, 8, 8] (C, H, W)) do not fit the config" in proc.stderr
    assert "pass data.latent_size=8" in proc.stderr and "pass data.latent_channels=4" in proc.stderr
    assert "Total params" not in proc.stdout + proc.stderr  # no model summary: nothing was built


def test_run_folder_is_named_by_the_overrides():
    """train.py's resolver is ditkit.training.identity.run_name (tested in test_run_identity.py)."""
    spec = importlib.util.spec_from_file_location("train", REPO / "train.py")
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)

    assert train.run_name([]) == "default"
    assert train.run_name(["objective=flow", "model=dit_b"]) == "model-dit_b+objective-flow"
    assert train.run_name(["data.urls=/a/b", "model=dit_b"]) == "model-dit_b"  # data's place
    assert train.run_name(["trainer.max_steps=9"]) == "default"  # "train longer" = same run


def test_submitit_launcher_config():
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(
            config_name="train",
            overrides=["hydra/launcher=submitit_slurm", "trainer.num_nodes=4"],
            return_hydra_config=True,
        )
    launcher = cfg.hydra.launcher
    assert (
        launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    )
    assert launcher.nodes == 4 and launcher.tasks_per_node == launcher.gpus_per_node == 8
    assert launcher.signal_delay_s == 120


def test_experiment_without_a_size_for_the_model_is_refused_before_training(tmp_path, run_train):
    """experiment=quickstart sizes dit_s and unet_s only: model=dit_b would be a full DiT-B on CPU."""
    proc = run_train(
        "experiment=quickstart",
        "model=dit_b",
        f"paths.output_dir={tmp_path}",
        "logger=csv",
        check=False,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "experiment=quickstart has model sizes for model=dit_s|unet_s only" in proc.stderr
    assert "conf/experiment_model/quickstart/dit_b.yaml" in proc.stderr
    assert "Seed set" not in proc.stdout + proc.stderr  # nothing was built
    check_experiment_sizes(REPO / "conf", "quickstart", "unet_s")  # a sized model passes
    check_experiment_sizes(REPO / "conf", "dit_xl2_in256", "dit_b")  # not a per-model experiment
