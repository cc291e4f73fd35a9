"""`make train` end to end: the quickstart trains on the built-in digits on the CPU, then its 200 guided
samples (20 per digit) must be recognised as the digit asked for by an SVM trained on the real digits."""

import json
import time

import pytest

pytestmark = pytest.mark.slow


def test_quickstart_samples_are_recognisable_digits(tmp_path, run_train):
    start = time.time()
    # What `make train` runs (WANDB_MODE=offline python train.py experiment=quickstart), in a fresh
    # folder for the runs and the built-in data, with the default thread count.
    run_train(
        "experiment=quickstart",
        f"paths.output_dir={tmp_path / 'outputs'}",
        f"paths.data_dir={tmp_path / 'data'}",
        timeout=900,
        one_thread=False,
    )
    minutes = (time.time() - start) / 60
    (score_file,) = (tmp_path / "outputs").glob("*/digits_score.json")
    score = json.loads(score_file.read_text())
    print(
        f"quickstart: {minutes:.1f} min, digits accuracy {score['accuracy']:.1%}, "
        f"per class {score['per_class']}"
    )
    assert score["num_samples"] == 200 and score["step"] > 0
    assert score["accuracy"] >= 0.8
    assert (score_file.parent / "checkpoints/last.ckpt").is_file()
    assert (score_file.parent / "digits_samples.png").is_file()
