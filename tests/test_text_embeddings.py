"""Text encoders (tiny CLIP + T5 built offline), captions, the captioned shard set, and the datamodule's
text batches."""

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from hydra import compose, initialize_config_dir

from ditkit.data import DataFormatError, LatentShardsDataModule
from ditkit.data.captions import DIGIT_WORDS, class_captions
from ditkit.data.text import TextEncoders, build_tiny_text_encoders, text_encoders_from_manifest

CONF = Path(__file__).parents[1] / "conf"
VOCAB = ["a", "handwritten", *DIGIT_WORDS]
CAPTIONS = class_captions([str(i) for i in range(10)], "a handwritten {}", DIGIT_WORDS)
DIGITS = ["captions.template='a handwritten {}'", f"captions.class_names=[{','.join(DIGIT_WORDS)}]"]


# One intra-op thread for every test here (the shared `one_thread` fixture).
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Specs of a tiny CLIP and T5 (width 32, 8 tokens) and, for padding, a CLIP of width 16."""
    folder = tmp_path_factory.mktemp("encoders")
    specs = build_tiny_text_encoders(str(folder / "w32"), VOCAB)
    narrow = build_tiny_text_encoders(str(folder / "w16"), VOCAB, width=16)
    return {"clip": specs[0], "t5": specs[1], "clip16": narrow[0]}


@pytest.fixture(scope="module")
def encoders(tiny):
    return TextEncoders([tiny["clip"], tiny["t5"]])


def test_tokenizer_words_and_unknowns(encoders):
    tokenizer = encoders.tokenizers[0]
    vocab = tokenizer.get_vocab()
    ids = tokenizer(["A handwritten seven", "a purple seven"], padding="max_length", max_length=8)[
        "input_ids"
    ]
    assert ids[0] == [2, vocab["a"], vocab["handwritten"], vocab["seven"], 3, 0, 0, 0]
    assert ids[1][2] == 1  # "purple" is not in the vocabulary: [UNK]


def test_context_and_pooled_are_the_encoders_outputs_sd3_style(encoders):
    """context = [CLIP penultimate hidden states ; T5 last hidden state] along the sequence,
    pooled = CLIP projection."""
    context, pooled = encoders(CAPTIONS[:3])
    assert context.shape == (3, 16, 32) and pooled.shape == (3, 32)
    assert (encoders.context_len, encoders.context_dim, encoders.pooled_dim) == (16, 32, 32)
    clip, t5 = encoders.models
    tokens = encoders.tokenizers[0](
        CAPTIONS[:3], padding="max_length", max_length=8, return_tensors="pt"
    )
    with torch.no_grad():
        out = clip(input_ids=tokens["input_ids"], output_hidden_states=True)
        t5_out = t5(
            input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]
        ).last_hidden_state
    torch.testing.assert_close(context[:, :8], out.hidden_states[-2], rtol=0, atol=0)
    torch.testing.assert_close(context[:, 8:], t5_out, rtol=0, atol=0)
    torch.testing.assert_close(pooled, out.text_embeds, rtol=0, atol=0)
    assert (
        torch.cdist(pooled, pooled)[~torch.eye(3, dtype=torch.bool)].min() > 0.1
    )  # captions told apart


def test_narrower_stream_is_zero_padded_and_t5_alone_pools_by_mean(tiny):
    mixed = TextEncoders([tiny["t5"], tiny["clip16"]])  # CLIP goes first whatever the order given
    context, pooled = mixed(CAPTIONS[:2])
    assert context.shape == (2, 16, 32) and pooled.shape == (2, 16)
    assert not context[:, :8, 16:].any() and context[:, :8, :16].abs().sum() > 0
    t5_only = TextEncoders([tiny["t5"]])
    context, pooled = t5_only(["a handwritten seven"])
    # <s> a handwritten seven </s> are 5 tokens: the mean runs over them, not the padding.
    torch.testing.assert_close(pooled, context[:, :5].mean(dim=1), rtol=1e-6, atol=1e-6)


def test_bad_encoder_specs_name_the_problem(tmp_path, tiny):
    with pytest.raises(ValueError, match="kind='bert'"):
        TextEncoders([{"kind": "bert", "pretrained": "x"}])
    with pytest.raises(ValueError, match="unknown keys"):
        TextEncoders([{**tiny["clip"], "layer": -2}])
    with pytest.raises(FileNotFoundError, match="cannot load the clip text encoder"):
        TextEncoders([{"kind": "clip", "pretrained": str(tmp_path / "nothing-here")}])
    with pytest.raises(ValueError, match="at most one T5"):
        TextEncoders([tiny["t5"], tiny["t5"]])


def extract(src: Path, out: Path, tiny, *overrides: str):
    from data_pipelines.extract_text_embeddings import run

    encoders = json.dumps([tiny["clip"], tiny["t5"]]).replace('"', "")
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            "extract_text_embeddings",
            overrides=[
                f"shards={src}",
                f"out={out}",
                f"encoders={encoders}",
                "progress=false",
                "batch_size=4",
                *overrides,
            ],
        )
    return run(cfg)


def read_samples(folder: Path) -> dict[str, dict]:
    samples = {}
    for tar in sorted(folder.glob("train-*.tar")):
        for s in wds.tariterators.tarfile_samples([{"url": str(tar)}]):
            samples[s["__key__"]] = {k: v for k, v in s.items() if not k.startswith("__")}
    return samples


@pytest.fixture(scope="module")
def captioned(tmp_path_factory, tiny, write_latent_shards):
    root = tmp_path_factory.mktemp("shards")
    write_latent_shards(root / "src", shard_sizes=(6, 5, 3))
    summary = extract(root / "src", root / "t2i", tiny, *DIGITS)
    return root, summary


def test_captioned_set_keeps_every_member_and_adds_the_text(captioned, encoders):
    root, summary = captioned
    assert summary["num_samples"] == 14 and (
        summary["context_len"],
        summary["context_dim"],
        summary["pooled_dim"],
    ) == (16, 32, 32)
    src, out = read_samples(root / "src"), read_samples(root / "t2i")
    assert list(src) == list(out)  # same samples, same order
    context, pooled = encoders(CAPTIONS)
    for key, sample in out.items():
        label = int(src[key]["cls"])
        assert {k: sample[k] for k in src[key]} == src[key]  # original members byte-identical
        assert sample["txt"].decode() == CAPTIONS[label]
        c, p = np.load(io.BytesIO(sample["context.npy"])), np.load(io.BytesIO(sample["pooled.npy"]))
        assert c.dtype == np.float16 and c.shape == (16, 32) and p.shape == (32,)
        np.testing.assert_array_equal(c, context[label].numpy().astype(np.float16))
        np.testing.assert_array_equal(p, pooled[label].numpy().astype(np.float16))
    manifest = json.loads((root / "t2i" / "manifest.json").read_text())
    assert manifest["text"]["captions"]["class_captions"] == CAPTIONS
    assert (
        manifest["num_samples"] == 14
        and manifest["shards"] == json.loads((root / "src" / "manifest.json").read_text())["shards"]
    )


def test_manifest_encoders_embed_prompts_exactly_as_stored(captioned):
    root, _ = captioned
    manifest = json.loads((root / "t2i" / "manifest.json").read_text())
    context, pooled = text_encoders_from_manifest(manifest)(["a handwritten three"])
    sample = next(
        s for s in read_samples(root / "t2i").values() if s["txt"] == b"a handwritten three"
    )
    np.testing.assert_array_equal(
        context[0].numpy().astype(np.float16), np.load(io.BytesIO(sample["context.npy"]))
    )
    np.testing.assert_array_equal(
        pooled[0].numpy().astype(np.float16), np.load(io.BytesIO(sample["pooled.npy"]))
    )


def test_rerun_rewrites_only_a_missing_shard_identically(captioned, tiny):
    root, _ = captioned
    out = root / "t2i"
    before = {p.name: p.read_bytes() for p in out.glob("train-*.tar")}
    kept = (out / "train-000000.tar").stat().st_mtime_ns
    (out / "train-000001.tar").unlink()
    extract(root / "src", out, tiny, *DIGITS)
    assert {p.name: p.read_bytes() for p in out.glob("train-*.tar")} == before
    assert (out / "train-000000.tar").stat().st_mtime_ns == kept


def test_captions_from_a_file_and_its_errors(captioned, tiny, tmp_path):
    root, _ = captioned
    keys = list(read_samples(root / "src"))
    table = {k: f"a handwritten {DIGIT_WORDS[i % 3]}" for i, k in enumerate(keys)}
    (tmp_path / "captions.json").write_text(json.dumps(table))
    extract(root / "src", tmp_path / "out", tiny, f"captions.file={tmp_path / 'captions.json'}")
    assert {k: s["txt"].decode() for k, s in read_samples(tmp_path / "out").items()} == table
    del table[keys[4]]
    (tmp_path / "short.json").write_text(json.dumps(table))
    with pytest.raises(DataFormatError, match=f"sample '{keys[4]}' has no caption"):
        extract(root / "src", tmp_path / "out2", tiny, f"captions.file={tmp_path / 'short.json'}")
    # The failed job completed no shard: rerun with a fixed file in the same out= (it was locked).
    extract(root / "src", tmp_path / "out2", tiny, f"captions.file={tmp_path / 'captions.json'}")
    assert read_samples(tmp_path / "out2").keys() == set(keys)
    with pytest.raises(DataFormatError, match="different text extraction"):
        extract(root / "src", tmp_path / "out", tiny, *DIGITS)  # same out=, other captions
    with pytest.raises(ValueError, match="out= must differ"):
        extract(root / "src", root / "src", tiny, *DIGITS)
    with pytest.raises(FileNotFoundError, match="manifest.json is missing"):
        extract(tmp_path / "nowhere", tmp_path / "out3", tiny, *DIGITS)
    with pytest.raises(ValueError, match="3 class names for 10 classes"):
        extract(root / "src", tmp_path / "out4", tiny, "captions.class_names=[a,b,c]")


def datamodule(root: Path, **kw):
    args = dict(
        latent_size=8,
        latent_channels=4,
        num_classes=10,
        image_size=8,
        root=str(root),
        batch_size=4,
        num_workers=0,
        return_keys=True,
        shuffle_buffer=4,
    )
    return LatentShardsDataModule(**{**args, **kw})


def test_datamodule_yields_the_stored_text_embeddings(captioned):
    root, _ = captioned
    stored = read_samples(root / "t2i")
    dm = datamodule(root / "t2i", context_len=16, context_dim=32, pooled_dim=32)
    cond = next(iter(dm.train_dataloader()))
    keys = cond["key"]
    assert set(cond) == {"x", "context", "pooled", "key"} and cond["context"].dtype == torch.float32
    for i, key in enumerate(keys):
        np.testing.assert_array_equal(
            cond["context"][i].numpy(),
            np.load(io.BytesIO(stored[key]["context.npy"])).astype(np.float32),
        )
        np.testing.assert_array_equal(
            cond["pooled"][i].numpy(),
            np.load(io.BytesIO(stored[key]["pooled.npy"])).astype(np.float32),
        )
    batch = next(iter(datamodule(root / "t2i").train_dataloader()))  # no text keys: labels
    labels, keys = batch["y"], batch["key"]
    assert set(batch) == {"x", "y", "key"}
    assert labels.tolist() == [int(stored[k]["cls"]) for k in keys]


def test_datamodule_text_mismatches_are_named(captioned):
    root, _ = captioned
    # Only the key that differs is named, with the override that fixes it.
    with pytest.raises(
        DataFormatError,
        match="data.context_dim=64, but the shards have 32: pass data.context_dim=32",
    ):
        datamodule(root / "t2i", context_len=16, context_dim=64, pooled_dim=32).setup()
    with pytest.raises(DataFormatError, match="carry no text embeddings"):
        datamodule(root / "src", context_len=16, context_dim=32, pooled_dim=32).setup()
    with pytest.raises(ValueError, match="Set all of data.context_len"):
        datamodule(root / "t2i", context_len=16)
