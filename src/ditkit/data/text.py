"""Text encoders for text-to-image training (SD3, Esser et al. 2024, Sec. 5.2): Hugging Face
`transformers` CLIP text models and / or a T5 encoder, loaded from a hub id or a local folder,
turning captions into

- ``context``: (N, L, D) the token sequence, and
- ``pooled``: (N, P) one vector per caption,

combined SD3's way: the CLIP encoders' penultimate hidden states are joined along channels, T5's
last hidden state follows along the sequence (each zero-padded to the wider of the two), and the
pooled vector is the CLIP projections joined (with T5 alone: T5's mean over the caption's tokens).
Like the VAE helpers, this is a tool of the data: the same encoders embed the training captions and,
later, the sampling prompts.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ditkit.offline import WeightsUnavailableError, hub_download_hint, is_network_error

KINDS = ("clip", "t5")
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class EncoderSpec:
    """One text encoder. pretrained: hub id or folder (`save_pretrained` layout); subfolder: e.g.
    "text_encoder" of a diffusers pipeline repo; tokenizer / tokenizer_subfolder: where its
    tokenizer is (default: beside the model); max_length: tokens per caption (captions are padded /
    cut to it, as SD3 does)."""

    kind: str
    pretrained: str
    subfolder: str | None = None
    tokenizer: str | None = None
    tokenizer_subfolder: str | None = None
    max_length: int = 77

    @classmethod
    def parse(cls, spec: Mapping[str, Any]) -> EncoderSpec:
        unknown = set(spec) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(
                f"text encoder spec has unknown keys {sorted(unknown)}; valid: "
                f"{list(cls.__dataclass_fields__)}"
            )
        if spec.get("kind") not in KINDS:
            raise ValueError(f"text encoder kind={spec.get('kind')!r}; choose one of {list(KINDS)}")
        if not spec.get("pretrained"):
            raise ValueError(f"text encoder {spec['kind']!r} needs pretrained=<hub id or folder>")
        return cls(**spec)

    def absolute(self) -> EncoderSpec:
        """Local folders made absolute (so a manifest still finds them from another working
        directory)."""

        def fix(path: str | None) -> str | None:
            return (
                os.path.abspath(os.path.expanduser(path))
                if path and os.path.isdir(os.path.expanduser(path))
                else path
            )

        return EncoderSpec(
            self.kind,
            fix(self.pretrained),
            self.subfolder,
            fix(self.tokenizer),
            self.tokenizer_subfolder,
            self.max_length,
        )


def _load(spec: EncoderSpec, override: str) -> tuple[nn.Module, Any, bool]:
    """(model, tokenizer, has_projection); a clear error when the weights are not there or
    incomplete, or cannot be fetched (`WeightsUnavailableError` naming ``override``, the setting
    that takes a local folder)."""
    from transformers import (
        AutoTokenizer,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        T5EncoderModel,
    )

    kwargs = {"subfolder": spec.subfolder} if spec.subfolder else {}
    try:
        if spec.kind == "clip":
            model, info = CLIPTextModelWithProjection.from_pretrained(
                spec.pretrained, output_loading_info=True, **kwargs
            )
            projection = "text_projection.weight" not in info["missing_keys"]
            if not projection:  # a bare CLIPTextModel checkpoint: pool with its own pooler output
                model, info = CLIPTextModel.from_pretrained(
                    spec.pretrained, output_loading_info=True, **kwargs
                )
        else:
            model, info = T5EncoderModel.from_pretrained(
                spec.pretrained, output_loading_info=True, **kwargs
            )
            projection = False
        tok_kwargs = {"subfolder": spec.tokenizer_subfolder} if spec.tokenizer_subfolder else {}
        tokenizer = AutoTokenizer.from_pretrained(spec.tokenizer or spec.pretrained, **tok_kwargs)
    except (OSError, ValueError) as err:
        if not os.path.isdir(spec.pretrained) and is_network_error(err):
            raise WeightsUnavailableError(
                f"the {spec.kind} text encoder {spec.pretrained!r} from the Hugging Face Hub",
                override,
                hub_download_hint(
                    spec.pretrained, spec.subfolder, local_dir=not override.startswith("HF_HOME")
                ),
                err,
            ) from err
        raise FileNotFoundError(
            f"cannot load the {spec.kind} text encoder {spec.pretrained!r} (subfolder "
            f"{spec.subfolder!r}): {err}. "
            "Give a hub id or a save_pretrained folder with its tokenizer."
        ) from err
    if info["missing_keys"]:
        raise ValueError(
            f"the {spec.kind} text encoder {spec.pretrained!r} lacks weights "
            f"{sorted(info['missing_keys'])[:5]}: "
            "it is not a complete checkpoint of that kind"
        )
    return model.eval().requires_grad_(False), tokenizer, projection


class TextEncoders(nn.Module):
    """The encoders of one data set, called on a list of captions. See the module docstring."""

    def __init__(
        self,
        specs: Iterable[Mapping[str, Any] | EncoderSpec],
        precision: str = "fp32",
        override: str = "encoders.{index}.pretrained=DIR",
    ):
        """override: how the caller's config takes a local copy of encoder ``index`` of `specs`
        (named when its weights cannot be fetched)."""
        super().__init__()
        self.specs = [s if isinstance(s, EncoderSpec) else EncoderSpec.parse(s) for s in specs]
        given = list(self.specs)
        if not self.specs:
            raise ValueError("no text encoders given: list at least one (kind: clip | t5)")
        if precision not in PRECISIONS:
            raise ValueError(f"precision={precision!r}; choose one of {sorted(PRECISIONS)}")
        self.clip = [s for s in self.specs if s.kind == "clip"]
        t5 = [s for s in self.specs if s.kind == "t5"]
        if len(t5) > 1 or len({s.max_length for s in self.clip}) > 1:
            raise ValueError(
                "use at most one T5 encoder, and one max_length for all CLIP encoders (their tokens align)"
            )
        self.specs = self.clip + t5  # CLIP first, whatever the order given: the layout is fixed
        loaded = [_load(s, override.format(index=given.index(s))) for s in self.specs]
        self.models = nn.ModuleList(m.to(PRECISIONS[precision]) for m, _, _ in loaded)
        self.tokenizers = [t for _, t, _ in loaded]
        self.projections = [p for _, _, p in loaded]
        widths = [
            m.config.hidden_size if s.kind == "clip" else m.config.d_model
            for s, (m, _, _) in zip(self.specs, loaded)
        ]
        clip_width = sum(w for s, w in zip(self.specs, widths) if s.kind == "clip")
        t5_width = widths[-1] if t5 else 0
        self.context_dim = max(clip_width, t5_width)
        self.context_len = (self.clip[0].max_length if self.clip else 0) + (
            t5[0].max_length if t5 else 0
        )
        self.pooled_dim = (
            sum(
                self._pooled_width(m, p)
                for s, (m, _, p) in zip(self.specs, loaded)
                if s.kind == "clip"
            )
            or t5_width
        )

    @staticmethod
    def _pooled_width(model: nn.Module, projection: bool) -> int:
        return model.config.projection_dim if projection else model.config.hidden_size

    def describe(self) -> dict[str, Any]:
        """What a manifest records: enough to load the same encoders again, and the embedding
        shapes."""
        return {
            "encoders": [asdict(s.absolute()) for s in self.specs],
            "context_len": self.context_len,
            "context_dim": self.context_dim,
            "pooled_dim": self.pooled_dim,
        }

    @torch.no_grad()
    def forward(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """captions: N strings -> context (N, context_len, context_dim), pooled (N, pooled_dim),
        float32."""
        device = next(self.parameters()).device
        clip_states, pooled, t5_state = [], [], None
        for spec, model, tokenizer, projection in zip(
            self.specs, self.models, self.tokenizers, self.projections
        ):
            tokens = tokenizer(
                list(captions),
                padding="max_length",
                max_length=spec.max_length,
                truncation=True,
                return_tensors="pt",
            ).to(device)
            if spec.kind == "clip":
                # SD3 feeds CLIP's penultimate layer and no attention mask (CLIP is causal: padding
                # never reaches the caption's own tokens), and pools at the end-of-text token.
                out = model(input_ids=tokens["input_ids"], output_hidden_states=True)
                clip_states.append(out.hidden_states[-2].float())
                pooled.append((out.text_embeds if projection else out.pooler_output).float())
            else:
                mask = tokens["attention_mask"]
                t5_state = model(
                    input_ids=tokens["input_ids"], attention_mask=mask
                ).last_hidden_state.float()
                if not self.clip:  # no CLIP to pool: T5's mean over the caption's own tokens
                    weights = mask[..., None].float()
                    pooled.append((t5_state * weights).sum(1) / weights.sum(1).clamp(min=1))
        parts = []
        if clip_states:
            parts.append(torch.cat(clip_states, dim=-1))
        if t5_state is not None:
            parts.append(t5_state)
        context = torch.cat([F.pad(p, (0, self.context_dim - p.shape[-1])) for p in parts], dim=1)
        return context, torch.cat(pooled, dim=-1)


def text_encoders_from_manifest(
    manifest: Mapping[str, Any],
    precision: str = "fp32",
    encoders: list[Mapping[str, Any]] | None = None,
) -> TextEncoders:
    """The encoders a captioned shard set was made with (`encoders` replaces them, e.g. local copies
    on an offline machine; they must give embeddings of the same shapes)."""
    text = manifest.get("text")
    if not text:
        raise ValueError(
            "these shards carry no text embeddings: make them with python -m "
            "data_pipelines.extract_text_embeddings"
        )
    model = TextEncoders(
        encoders if encoders is not None else text["encoders"],
        precision=precision,
        # The shards name hub ids: a Hugging Face cache that holds them serves them offline.
        override="HF_HOME=<that cache folder> HF_HUB_OFFLINE=1 in front of the command",
    )
    got = (model.context_len, model.context_dim, model.pooled_dim)
    want = (text["context_len"], text["context_dim"], text["pooled_dim"])
    if got != want:
        raise ValueError(
            f"the text encoders give (context_len, context_dim, pooled_dim) = {got}, the shards hold {want}"
        )
    return model


def build_tiny_text_encoders(
    folder: str, vocabulary: Iterable[str], seed: int = 0, width: int = 32, max_length: int = 8
) -> list[dict[str, Any]]:
    """Randomly initialised 2-layer CLIP text model (with projection) and T5 encoder of width
    `width`, with a word-level tokenizer over `vocabulary` (lower-cased words; others map to [UNK]),
    saved under `folder`/clip and `folder`/t5. Nothing is downloaded: for tests and the CPU
    quickstart, where captions only have to be told apart. Returns their specs for
    `TextEncoders`."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import (
        CLIPTextConfig,
        CLIPTextModelWithProjection,
        PreTrainedTokenizerFast,
        T5Config,
        T5EncoderModel,
    )

    special = ["[PAD]", "[UNK]", "<s>", "</s>"]
    words = sorted({w.lower() for w in vocabulary} - set(special))
    vocab = {token: i for i, token in enumerate(special + words)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", 2), ("</s>", 3)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="[PAD]",
        unk_token="[UNK]",
        model_max_length=max_length,
    )
    ids = dict(pad_token_id=0, bos_token_id=2, eos_token_id=3)
    torch.manual_seed(seed)
    clip = CLIPTextModelWithProjection(
        CLIPTextConfig(
            vocab_size=len(vocab),
            hidden_size=width,
            intermediate_size=2 * width,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=max_length,
            projection_dim=width,
            **ids,
        )
    )
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=len(vocab),
            d_model=width,
            d_kv=width // 4,
            d_ff=2 * width,
            num_layers=2,
            num_heads=4,
            decoder_start_token_id=0,
            **ids,
        )
    )
    specs = []
    for kind, model in (("clip", clip), ("t5", t5)):
        path = os.path.join(folder, kind)
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        specs.append({"kind": kind, "pretrained": os.path.abspath(path), "max_length": max_length})
    return specs


def class_prompts(manifest: Mapping[str, Any], labels: Iterable[int]) -> list[str]:
    """The caption of each label's class in a set captioned by class ("a handwritten seven" for
    7)."""
    captions = (manifest.get("text") or {}).get("captions", {})
    if captions.get("source") != "classes":
        raise ValueError(
            "these shards were not captioned by class: give prompts (a list, or prompts=FILE) "
            "instead of labels"
        )
    return [captions["class_captions"][int(i)] for i in labels]
