"""Fixtures shared by the test files."""

from pathlib import Path

import pytest

from ditkit.objectives.samplers import register_configs


@pytest.fixture(autouse=True, scope="session")
def sampler_configs():
    """evaluate.py's `sampler` group comes from the sampler registry (ConfigStore), as in the entry
    point; tests that compose evaluate.yaml need it registered."""
    register_configs()


@pytest.fixture(scope="session")
def inception_weights(tmp_path_factory) -> Path:
    """Path of a stand-in Inception weights file (random, informative features), made once per
    session: nothing downloads."""
    from helpers_fid import make_standin_inception_weights

    return make_standin_inception_weights(
        tmp_path_factory.mktemp("inception") / "inception-standin.pth"
    )
