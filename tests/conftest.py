"""Fixtures shared by the test files.

Most are factory fixtures: session-scoped, each returns the function of the same name, which a test
(or a module- or session-scoped fixture of its own) calls with its arguments, e.g.
`write_synthetic_shards(tmp_path / "shards")`. They live in tests/plugins/, one module per group:

- training: `tiny_model`, `tiny_dit` and `tiny_batches` (the same DiT and data in process),
  `write_synthetic_shards`, `data_overrides`, `run_overrides`, `train_cmd`,
  `torchrun_cmd`, `run_train` (train.py in a fresh process);
- data: `tiny_autoencoder`, `synthetic_moments`, `write_latent_shards`, `datamodule_kwargs`,
  `make_image_folder`;
- FID: `inception_weights` (a path), `blob_images`, `write_image_folder`, `run_evaluate`
  (evaluate.py in a fresh process), `make_reference`;
- encoders: `save_tiny_encoder` (a tiny random transformers vision model, saved), `uint8_images`.

Two helper modules sit beside them: tests/tiny_diffusers.py (the tiny diffusers configs the
diffusers tests import) and tests/train_callbacks.py (Lightning callbacks that train.py subprocesses
build from a Hydra `_target_`, importable in the child because run_train puts tests/ on its
PYTHONPATH; no test module imports it).
"""

import pytest

from ditkit.objectives.samplers import register_configs

pytest_plugins = ["plugins.training", "plugins.data", "plugins.fid", "plugins.encoders"]


@pytest.fixture(autouse=True, scope="session")
def sampler_configs():
    """evaluate.py's `sampler` group comes from the sampler registry (ConfigStore), as in the entry
    point; tests that compose evaluate.yaml need it registered."""
    register_configs()
