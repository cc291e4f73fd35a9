"""evaluate.py compile=true compiles the model's blocks (compile_blocks, the training and
benchmarks/sample.py path) after moving it to the device and before the first sample; compile=false
leaves them alone. compile_blocks is replaced by a recorder: a real CPU compile takes minutes."""

import pytest
from test_evaluate_inputs import files, run  # noqa: F401 - files is a fixture

import ditkit.evaluation
import ditkit.training.parallel


class Compiled(Exception):
    """Raised by the stand-in compile_blocks: stops evaluate() right where it would compile."""


@pytest.fixture
def recorder(monkeypatch):
    seen = []

    def compile_blocks(model):
        seen.append(model)
        raise Compiled

    monkeypatch.setattr(ditkit.training.parallel, "compile_blocks", compile_blocks)
    # No Inception weights are needed to reach the model: the stand-ins keep the run offline.
    monkeypatch.setattr(ditkit.evaluation, "load_inception", lambda *a, **k: None)
    monkeypatch.setattr(ditkit.evaluation, "inception_fingerprint", lambda *a: "x")
    return seen


def test_compile_true_compiles_the_blocks_of_the_sampling_model(files, recorder):  # noqa: F811
    with pytest.raises(Compiled):
        run(files, "compile=true", "precision=bf16-mixed")
    (model,) = recorder
    assert type(model).__name__ == "DiT" and len(model.blocks) > 0
    assert next(model.parameters()).device.type == "cpu"  # moved to the device first


def test_compile_false_leaves_the_model_eager(files, recorder, monkeypatch):  # noqa: F811
    class Planned(Exception):
        pass

    def stop(*args, **kwargs):
        raise Planned

    monkeypatch.setattr(ditkit.evaluation, "SamplingPlan", stop)  # the step after the compile
    with pytest.raises(Planned):
        run(files, "compile=false")
    assert recorder == []
