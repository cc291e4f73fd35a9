"""Captions and their text embeddings in latent shards (the engine behind
`python -m data_pipelines.extract_text_embeddings`).

A captioned shard set is a NEW folder: every shard of the source set rewritten with each sample's
members unchanged plus ``txt`` (the caption, UTF-8), ``context.npy`` (float16 [L, D], the token
embeddings) and ``pooled.npy`` (float16 [P]). Its manifest is the source's with a ``text`` section:
the encoders (to embed prompts the same way at sampling time), the shapes, and how captions were
made. Shard i is written under a temporary name and renamed when complete, so a rerun finishes an
interrupted job.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import webdataset as wds
from tqdm import tqdm

from ditkit.checkpoints.atomic import atomic_write
from ditkit.data.format import (
    CONTEXT,
    MANIFEST,
    POOLED,
    TXT,
    DataFormatError,
    decode_label,
    npy_bytes,
    parse_manifest,
    tar_writer,
    write_json_atomic,
)

DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
JOB = ".text_job.json"


def class_captions(
    classes: list[str], template: str, class_names: list[str] | None = None
) -> list[str]:
    """One caption per class: template.format(name), name = class_names[i] or the manifest's class
    name. For the digits, class_names=DIGIT_WORDS and template "a handwritten {}" give "a
    handwritten seven"."""
    names = list(class_names) if class_names is not None else list(classes)
    if len(names) != len(classes):
        raise ValueError(
            f"{len(names)} class names for {len(classes)} classes; give one name per class"
        )
    if "{}" not in template:
        raise ValueError(f"caption template {template!r} has no '{{}}' for the class name")
    return [template.format(name) for name in names]


def read_captions_file(path: str) -> dict[str, str]:
    """A JSON object {sample key: caption}."""
    try:
        with open(os.path.expanduser(path)) as f:
            captions = json.load(f)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"captions file {path} does not exist") from err
    except json.JSONDecodeError as err:
        raise ValueError(
            f'captions file {path} is not JSON ({err}); expected {{"<sample key>": "<caption>"}}'
        ) from err
    if not isinstance(captions, dict) or not all(isinstance(v, str) for v in captions.values()):
        raise ValueError(
            f"captions file {path} must be a JSON object mapping sample keys to caption strings"
        )
    return captions


def captioner(
    manifest: Mapping[str, Any],
    captions_file: str | None,
    template: str | None,
    class_names: list[str] | None,
) -> tuple[Callable[[str, int], str], dict[str, Any]]:
    """(key, label) -> caption, from a captions file or from the class names; and its manifest
    record."""
    if captions_file is not None:
        table = read_captions_file(captions_file)

        def from_file(key: str, label: int) -> str:
            if key not in table:
                raise DataFormatError(
                    f"sample {key!r} has no caption in {captions_file}; add it, or caption by class"
                )
            return table[key]

        return from_file, {
            "source": "file",
            "file": os.path.abspath(os.path.expanduser(captions_file)),
        }
    if template is None:
        raise ValueError(
            "give captions.file=<JSON of key -> caption>, or captions.template='... {} ...' to "
            "caption by class"
        )
    per_class = class_captions(
        manifest.get("classes") or [str(i) for i in range(manifest["num_classes"])],
        template,
        class_names,
    )
    return (lambda key, label: per_class[label]), {
        "source": "classes",
        "template": template,
        "class_names": class_names,
        "class_captions": per_class,
    }


def _check_job(out: str, job: dict[str, Any], shards: list[str]) -> None:
    """Refuse to finish a folder in which another extraction (other encoders, captions or source)
    completed shards. One that failed before completing any (a bad captions file) left nothing to
    keep: this job takes its folder over."""
    path = os.path.join(out, JOB)
    if os.path.isfile(path):
        with open(path) as f:
            previous = json.load(f)
        done = [name for name in shards if os.path.isfile(os.path.join(out, name))]
        if previous != job and done:
            changed = sorted(k for k in set(job) | set(previous) if job.get(k) != previous.get(k))
            raise DataFormatError(
                f"out={out} holds {len(done)} shards of a different text extraction (changed: "
                f"{', '.join(changed)}); use a new out= folder or delete this one"
            )
    write_json_atomic(path, job)


def _encode_batch(
    encoders: Any, batch: list[dict[str, Any]], captions: list[str]
) -> list[dict[str, Any]]:
    """Each distinct caption is encoded once (captions by class repeat; every caption is padded to
    the encoders' max_length, so its embedding does not depend on the rest of the batch)."""
    unique = list(dict.fromkeys(captions))
    context, pooled = encoders(unique)
    context, pooled = (
        context.cpu().numpy().astype(np.float16),
        pooled.cpu().numpy().astype(np.float16),
    )
    index = {caption: i for i, caption in enumerate(unique)}
    out = []
    for sample, caption in zip(batch, captions):
        kept = {k: v for k, v in sample.items() if not k.startswith("__") or k == "__key__"}
        i = index[caption]
        out.append(
            {
                **kept,
                TXT: caption.encode("utf-8"),
                CONTEXT: npy_bytes(context[i]),
                POOLED: npy_bytes(pooled[i]),
            }
        )
    return out


def add_text_embeddings(
    src: str,
    out: str,
    encoders: Any,
    caption: Callable[[str, int], str],
    captions_record: dict[str, Any],
    batch_size: int = 64,
    progress: bool = True,
) -> dict[str, Any]:
    """Write the captioned copy of the shard set `src` to `out` (see the module docstring); returns
    its manifest.

    encoders: a `TextEncoders` (captions -> context, pooled). caption: (key, label) -> str."""
    src, out = os.path.abspath(os.path.expanduser(src)), os.path.abspath(os.path.expanduser(out))
    if src == out:
        raise ValueError(
            "out= must differ from the source shard folder: the captioned set is written beside it"
        )
    where = os.path.join(src, MANIFEST)
    if not os.path.isfile(where):
        raise FileNotFoundError(
            f"{where} is missing: shards= must be a latent shard folder (data_pipelines.extract_latents)"
        )
    with open(where) as f:
        manifest = parse_manifest(f.read(), where)
    text = {**encoders.describe(), "dtype": "float16", "captions": captions_record}
    os.makedirs(out, exist_ok=True)
    _check_job(
        out,
        {"source_shards": src, "source_num_samples": manifest["num_samples"], "text": text},
        [shard["name"] for shard in manifest["shards"]],
    )
    bar = tqdm(
        total=manifest["num_samples"], unit="caption", desc="text embeddings", disable=not progress
    )
    for shard in manifest["shards"]:
        target = os.path.join(out, shard["name"])
        if os.path.isfile(target):  # complete: written by an earlier run of this same job
            bar.update(shard["num_samples"])
            continue
        with atomic_write(target) as f, tar_writer(f) as tar:
            pending: list[dict[str, Any]] = []
            path = os.path.join(src, shard["name"])
            try:
                for sample in wds.tariterators.tarfile_samples([{"url": path}]):
                    pending.append(sample)
                    if len(pending) == batch_size:
                        _write(tar, encoders, pending, caption, bar)
                        pending = []
            except (OSError, ValueError) as err:
                raise DataFormatError(
                    f"{path} cannot be read ({err}); rerun data_pipelines.extract_latents for it"
                ) from err
            _write(tar, encoders, pending, caption, bar)
    bar.close()
    captioned = {
        **manifest,
        "text": text,
        "source_shards": src,
        "fields": {
            **manifest.get("fields", {}),
            TXT: "caption",
            CONTEXT: "text token embeddings [L, D]",
            POOLED: "pooled text embedding [P]",
        },
    }
    write_json_atomic(os.path.join(out, MANIFEST), captioned)
    return captioned


def _write(
    tar: Any,
    encoders: Any,
    batch: list[dict[str, Any]],
    caption: Callable[[str, int], str],
    bar: Any,
) -> None:
    if not batch:
        return
    captions = [caption(s["__key__"], decode_label(s)) for s in batch]
    for sample in _encode_batch(encoders, batch, captions):
        tar.write(sample)
    bar.update(len(batch))


DIGITS_TEMPLATE = "a handwritten {}"
# The tiny tokenizer's words: the captions' and a few a prompt might use (others become [UNK]).
DIGITS_VOCABULARY = ["a", "the", "handwritten", "digit", "number", "of", *DIGIT_WORDS]


def build_captioned_digits(root: str, image_size: int = 16, progress: bool = True) -> str:
    """The built-in text-to-image set at ``root``: the built-in digits (built beside it as
    ``digits<size>``) captioned "a handwritten seven" etc. and embedded by tiny random CLIP + T5
    text encoders made offline in ``text_encoders_tiny`` beside it (width 32, 8 tokens each: context
    (16, 32), pooled (32,)). Built in a temporary folder and renamed, like the digits themselves.
    Returns ``root``."""
    from ditkit.data.digits import build_digits, publish
    from ditkit.data.text import TextEncoders, build_tiny_text_encoders

    root = os.path.abspath(os.path.expanduser(root))
    if os.path.isfile(os.path.join(root, MANIFEST)):
        return root
    if os.path.exists(root) and os.listdir(root):
        raise FileExistsError(
            f"{root} exists but holds no {MANIFEST}; delete it or point data.root elsewhere"
        )
    parent = os.path.dirname(root)
    source = build_digits(
        os.path.join(parent, f"digits{image_size}"), image_size=image_size, progress=progress
    )
    encoders_dir = os.path.join(parent, "text_encoders_tiny")
    if not os.path.isdir(encoders_dir):
        tmp = f"{encoders_dir}.building-{os.getpid()}"
        build_tiny_text_encoders(tmp, DIGITS_VOCABULARY)
        try:
            os.rename(tmp, encoders_dir)
        except OSError:  # another process built them first: the same seed gives the same weights
            shutil.rmtree(tmp, ignore_errors=True)
    specs = [
        {"kind": kind, "pretrained": os.path.join(encoders_dir, kind), "max_length": 8}
        for kind in ("clip", "t5")
    ]
    with open(os.path.join(source, MANIFEST)) as f:
        manifest = parse_manifest(f.read(), source)
    caption, record = captioner(manifest, None, DIGITS_TEMPLATE, DIGIT_WORDS)
    tmp = f"{root}.building-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    add_text_embeddings(
        source, tmp, TextEncoders(specs), caption, record, batch_size=256, progress=progress
    )
    return publish(tmp, root)
