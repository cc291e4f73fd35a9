"""Sampling from prompts: the prompts file, prompt-major order and batch-size invariance of `sample_prompts`,
and the training callbacks' conditions for captioned data."""

import contextlib
from types import SimpleNamespace

import pytest
import torch

from ditkit.data.captions import DIGIT_WORDS, class_captions
from ditkit.data.text import TextEncoders, build_tiny_text_encoders
from ditkit.evaluation.prompts import read_prompts, sample_prompts
from ditkit.models import MMDiT
from ditkit.objectives import RectifiedFlow
from ditkit.training.samples import conditions


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    return TextEncoders(
        build_tiny_text_encoders(
            str(tmp_path_factory.mktemp("enc")), ["a", "handwritten", *DIGIT_WORDS]
        )
    )


def test_read_prompts(tmp_path):
    (tmp_path / "p.txt").write_text("a handwritten one\n\n  a handwritten two  \n")
    assert read_prompts(tmp_path / "p.txt") == ["a handwritten one", "a handwritten two"]
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(ValueError, match="holds no prompt"):
        read_prompts(tmp_path / "empty.txt")
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_prompts(tmp_path / "missing.txt")


def sample(model, encoders, prompts, batch_size):
    return sample_prompts(
        model,
        RectifiedFlow(),
        lambda z: z,
        encoders,
        prompts,
        3,
        seed=7,
        batch_size=batch_size,
        sample_kwargs={"sampler": "euler", "steps": 2, "cfg_scale": 3.0},
        device="cpu",
        autocast=contextlib.nullcontext,
        progress=False,
    )


def test_prompt_major_order_and_batch_size_invariance(encoders):
    model = MMDiT(
        input_size=4,
        patch_size=2,
        in_channels=3,
        depth=2,
        head_dim=8,
        context_dim=32,
        pooled_dim=32,
        context_len=16,
    ).eval()
    for (
        p
    ) in model.parameters():  # non-zero output layer and gates, so the prompt shows in the images
        torch.nn.init.normal_(p, std=0.3)
    prompts = ["a handwritten one", "a handwritten two"]
    images = sample(model, encoders, prompts, batch_size=6)
    assert images.shape == (6, 3, 4, 4) and images.dtype == torch.uint8
    torch.testing.assert_close(
        sample(model, encoders, prompts, batch_size=4), images, rtol=0, atol=0
    )
    other = sample(model, encoders, ["a handwritten one", "a handwritten nine"], batch_size=6)
    torch.testing.assert_close(other[:3], images[:3], rtol=0, atol=0)  # row of prompt 0 unchanged
    assert not torch.equal(other[3:], images[3:])  # row of prompt 1 follows its prompt


def test_callback_conditions_for_captioned_data(encoders):
    labels = torch.tensor([7, 3, 7])
    labelled = SimpleNamespace(condition_keys=("y",))
    text = SimpleNamespace(condition_keys=("context", "pooled"))
    assert conditions(None, labelled, labels)["y"] is labels  # a class-conditional backbone
    captions = class_captions([str(i) for i in range(10)], "a handwritten {}", DIGIT_WORDS)
    manifest = {
        "text": {
            **encoders.describe(),
            "captions": {"source": "classes", "class_captions": captions},
        }
    }
    trainer = SimpleNamespace(
        datamodule=SimpleNamespace(text=(16, 32, 32), manifest=manifest, setup=lambda: None)
    )
    cond = conditions(trainer, text, labels)
    context, pooled = encoders(
        ["a handwritten seven", "a handwritten three", "a handwritten seven"]
    )
    torch.testing.assert_close(cond["context"], context, rtol=0, atol=0)
    torch.testing.assert_close(cond["pooled"], pooled, rtol=0, atol=0)
    cond = conditions(
        trainer, text, labels, prompts=["a handwritten one", "a handwritten two"]
    )  # prompts cycle
    torch.testing.assert_close(
        cond["pooled"], encoders(["a handwritten one", "a handwritten two", "a handwritten one"])[1]
    )
