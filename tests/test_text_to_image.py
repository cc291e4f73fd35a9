"""Acceptance of the text-to-image path (issue 7), end to end on CPU: tiny CLIP + T5 text encoders built from
configs (no download) embed the captions of the built-in digits into shards; `train.py` trains a tiny MMDiT
on them with rectified flow; `evaluate.py prompts=FILE` samples each prompt "a handwritten <digit>" with
guidance; an SVM trained on the real digits must assign at least 70% of the samples to the prompted digit."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from ditkit.data.captions import DIGIT_WORDS
from ditkit.data.digits import build_digits
from ditkit.data.text import build_tiny_text_encoders

REPO = Path(__file__).parents[1]


def run(*args: str, cwd: Path) -> str:
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "1"}
    proc = subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
def test_prompted_digits_are_recognised(tmp_path):
    from sklearn.svm import SVC

    from data_pipelines.extract_text_embeddings import run as extract
    from ditkit.training.samples import digits_features, real_digits

    source = build_digits(str(tmp_path / "digits16"), progress=False)
    specs = build_tiny_text_encoders(str(tmp_path / "encoders"), ["a", "handwritten", *DIGIT_WORDS])
    encoders = json.dumps(specs).replace('"', "")
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(
            "extract_text_embeddings",
            overrides=[
                f"shards={source}",
                f"out={tmp_path / 'digits16-t2i'}",
                f"encoders={encoders}",
                "progress=false",
                "captions.template='a handwritten {}'",
                f"captions.class_names=[{','.join(DIGIT_WORDS)}]",
            ],
        )
    summary = extract(cfg)
    assert (
        summary["num_samples"],
        summary["context_len"],
        summary["context_dim"],
        summary["pooled_dim"],
    ) == (1797, 16, 32, 32)

    run(
        str(REPO / "train.py"),
        "experiment=quickstart_t2i",
        f"data.root={tmp_path / 'digits16-t2i'}",
        "data.builtin=null",
        "trainer.max_steps=500",
        "logger=csv",
        f"paths.output_dir={tmp_path / 'runs'}",
        "run_name=t2i",
        "~callbacks.sample_grid",
        "~callbacks.digits_score",
        cwd=tmp_path,
    )
    ckpt = tmp_path / "runs" / "t2i" / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()

    prompts = [f"a handwritten {word}" for word in DIGIT_WORDS]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    out = run(
        str(REPO / "evaluate.py"),
        f"ckpt={ckpt}",
        "prompts=prompts.txt",
        "per_prompt=20",
        "sampler=euler",
        "sampler.steps=20",
        "cfg_scale=4.0",
        "batch_size=200",
        f"output_dir={tmp_path / 'eval'}",
        "progress=false",
        cwd=tmp_path,
    )
    # The result is the last JSON line (evaluate.py then says where it wrote the samples).
    record = [line for line in out.strip().splitlines() if line.startswith("{")][-1]
    grid = Path(json.loads(record)["grid"])
    assert grid.is_file()
    samples = np.load(grid.with_suffix(".npz"))
    assert samples["arr_0"].shape == (200, 16, 16, 3) and samples["prompts"].tolist() == prompts

    images, targets = real_digits(16)
    classifier = SVC().fit(digits_features(images), targets)
    generated = samples["arr_0"].transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1
    asked = np.repeat(
        np.arange(10), 20
    )  # prompt-major: 20 samples of "a handwritten zero", then "one", ...
    accuracy = (classifier.predict(digits_features(generated)) == asked).mean()
    assert accuracy >= 0.7, accuracy
