"""Objective terms: extra losses with their own trainable parameters (an alignment projector, an
extra token head), computed on the objective's own training forward.

A term is an `nn.Module`. The objective calls `term.bind(model)` once, when the training module is
built (so it can size its parameters for the backbone), and then, at every step, `term(inputs)` with
the batch, the noisy input, the time, the model's output and the block outputs the term asked for in
`depths`. The objective adds `term.weight * value` to its per-sample loss and reports the unweighted
value under the term's name. The training module trains, shards, clips, checkpoints and resumes the
terms' parameters together with the backbone's (`Objective.trainable_modules`).
docs/extending.md walks through writing one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class TermInputs:
    """What a term sees at one training step.

    batch: the loader's dict (fields the module does not know, e.g. "image", pass through);
    x_t: (N, C, H, W) the noisy input; time: (N,) the objective's time (flow: t in [0, 1], t = 1
    noise; ddpm: the step index); output: (N, C_out, H, W) float32, the model's output;
    hidden: {depth: the output of block `depth` (1-based), e.g. (N, T, D) tokens}."""

    model: nn.Module
    batch: Mapping[str, torch.Tensor]
    x_t: torch.Tensor
    time: torch.Tensor
    output: torch.Tensor
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)
    # A joint-token term's (prediction, target) velocities, both (N, K, E) (None without one).
    joint: tuple[torch.Tensor, torch.Tensor] | None = None


class Term(nn.Module):
    """Base of objective terms. Subclasses set `depths` (the block outputs they read, 1-based) and
    implement `bind` (build parameters for the backbone) and `forward(inputs) -> (N,)`, or
    `-> {suffix: (N,)}` for several parts, weighted by `part_weights()`.

    A term that adds joint tokens (REG) also overrides `joint_tokens` and `joint_forward` and sets
    `used_in_sampling`: its parameters are then needed to sample, and evaluate.py keeps it."""

    depths: tuple[int, ...] = ()
    used_in_sampling = False
    adds_joint_tokens = False  # True: joint_tokens / joint_forward / joint_shape are defined

    def __init__(self, weight: float = 1.0) -> None:
        super().__init__()
        if weight < 0:
            raise ValueError(f"a term's weight must be >= 0, got {weight}")
        self.weight = float(weight)

    def bind(self, model: nn.Module) -> None:
        """Build the parameters sized for `model` (called once, before the optimizer exists)."""

    def forward(self, inputs: TermInputs) -> torch.Tensor | dict[str, torch.Tensor]:
        """-> (N,) per-sample values; the objective adds weight * value to the loss."""
        raise NotImplementedError

    def part_weights(self) -> dict[str, float]:
        """{suffix: weight} of the parts a dict-valued forward returns ("" is the term's name)."""
        return {"": self.weight}

    def joint_tokens(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
        """(N, K, E) clean tokens the objective noises with the image's t and denoises jointly
        (REG's class token), or None (most terms)."""
        return None

    def joint_forward(
        self,
        model: nn.Module,
        x: torch.Tensor,
        t: torch.Tensor,
        condition: dict,
        tokens_t: torch.Tensor,
        depths: tuple[int, ...] = (),
    ) -> tuple[torch.Tensor, torch.Tensor, dict[int, torch.Tensor]]:
        """The backbone's forward with the noisy joint tokens (N, K, E): (its output, the tokens'
        predicted velocity (N, K, E), the outputs of blocks `depths`)."""
        raise NotImplementedError(f"{type(self).__name__} adds no joint tokens")

    @classmethod
    def sampling_overrides(cls, state: Mapping[str, torch.Tensor]) -> dict:
        """Config overrides that build the term for sampling only from its saved `state` (drop
        training-only parts, e.g. the frozen encoder); used when `used_in_sampling`."""
        return {}


class LinearProbe(Term):
    """A linear classifier of the class label on the hidden state after block `depth`, trained on
    the fly: REPA (Yu et al. 2025, Fig. 2) measures how semantic DiT features are this way.

    The hidden tokens (N, T, D) are mean-pooled and detached, so the probe learns from the
    backbone without changing it; value = the per-sample cross-entropy of the label (N,).
    Class-conditional token backbones (a `hidden_size`: DiT) only."""

    def __init__(self, depth: int, weight: float = 1.0) -> None:
        super().__init__(weight)
        if depth < 1:
            raise ValueError(f"LinearProbe depth counts blocks from 1, got {depth}")
        self.depths = (depth,)

    def bind(self, model: nn.Module) -> None:
        if tuple(model.condition_keys) != ("y",) or not hasattr(model, "hidden_size"):
            raise ValueError(
                f"LinearProbe needs a class-conditional backbone with a hidden_size (DiT); "
                f"{type(model).__name__} takes {list(model.condition_keys)}"
            )
        self.head = nn.Linear(model.hidden_size, model.num_classes)

    def forward(self, inputs: TermInputs) -> torch.Tensor:
        pooled = inputs.hidden[self.depths[0]].detach().mean(1)  # (N, T, D) -> (N, D)
        logits = self.head(pooled.to(self.head.weight.dtype))
        # The loss in float32 at least (bf16 logits under autocast), float64 in a float64 run.
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        return F.cross_entropy(logits, inputs.batch["y"], reduction="none")


def check_depths(model: nn.Module, terms: Mapping[str, Term]) -> None:
    """Every depth a term reads must name a block of `model` (1 .. len(model.blocks))."""
    depth = len(model.blocks)
    for name, term in terms.items():
        bad = [d for d in term.depths if not 1 <= d <= depth]
        if bad:
            raise ValueError(
                f"objective term {name!r} reads block outputs {bad}, but the backbone has blocks "
                f"1..{depth}; choose a depth in that range"
            )


@contextlib.contextmanager
def capture_block_outputs(model: nn.Module, depths: tuple[int, ...]) -> Iterator[dict]:
    """Record the output of blocks `depths` (1-based) during the forwards inside the block.

    Forward hooks on the block modules: they fire around FSDP2's gather and outside a compiled or
    checkpointed `forward`, so capture works with every way `ditkit.training.parallel` wraps a
    block. A block returning a tuple (MMDiT: image, text tokens) is recorded by its first
    element."""
    hidden: dict[int, torch.Tensor] = {}
    handles = []

    def recorder(depth: int):
        def hook(module: nn.Module, args, output) -> None:
            hidden[depth] = output[0] if isinstance(output, tuple) else output

        return hook

    for d in depths:
        handles.append(model.blocks[d - 1].register_forward_hook(recorder(d)))
    try:
        yield hidden
    finally:
        for handle in handles:
            handle.remove()


# ---------------------------------------------------------------------- joint tokens at sampling
def token_channels(numel: int, height: int, width: int) -> int:
    """How many extra H x W channels hold `numel` token values per sample (zero-padded)."""
    return -(-numel // (height * width))


def pack_tokens(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(N, K, E) -> (N, P, H, W), P = ceil(K E / (H W)): the K E values in raster order, then
    zeros (the padding)."""
    n, numel = tokens.shape[0], tokens[0].numel()
    p = token_channels(numel, height, width)
    flat = F.pad(tokens.reshape(n, numel), (0, p * height * width - numel))
    return flat.reshape(n, p, height, width)


def unpack_tokens(packed: torch.Tensor, k: int, e: int) -> torch.Tensor:
    """(N, P, H, W) -> (N, K, E): the inverse of pack_tokens (the padding dropped)."""
    return packed.reshape(packed.shape[0], -1)[:, : k * e].reshape(-1, k, e)


class JointTokenModel:
    """The backbone and a joint-token term as one model of the sampler's state (N, C + P, H, W):
    the image's C channels, then the term's (N, K, E) tokens packed into P channels.

    Every registered sampler and classifier-free guidance then integrate (and guide) the tokens
    with the image, unchanged; the padding's velocity is 0. condition_keys, null_condition and the
    other attributes are the backbone's."""

    def __init__(self, model: nn.Module, term: Term, channels: int, tokens: tuple[int, int]):
        self.model, self.term, self.channels = model, term, int(channels)
        self.k, self.e = tokens

    def __getattr__(self, name: str):
        # Only reached for names not set in __init__: the backbone's contract attributes.
        return getattr(self.__dict__["model"], name)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **condition) -> torch.Tensor:
        """x: (N, C + P, H, W), t: (N,) -> (N, C + P, H, W), or (N, 2 (C + P), H, W) when the
        backbone learns a variance (the token's half of it is 0)."""
        c, (h, w) = self.channels, x.shape[-2:]
        tokens = unpack_tokens(x[:, c:], self.k, self.e)
        out, velocity, _ = self.term.joint_forward(self.model, x[:, :c], t, condition, tokens)
        packed = pack_tokens(velocity.to(out.dtype), h, w)
        if out.shape[1] == 2 * c:
            return torch.cat([out[:, :c], packed, out[:, c:], torch.zeros_like(packed)], dim=1)
        return torch.cat([out, packed], dim=1)


def joint_sampling_state(
    model: nn.Module, term: Term, x_T: torch.Tensor
) -> tuple[JointTokenModel, torch.Tensor]:
    """(wrapped model, x_T with the tokens' unit noise packed after its channels). The token noise
    is drawn from the global torch RNG on x_T's device (evaluation seeds it per batch); an x_T that
    already has the extra channels keeps them."""
    n, c, h, w = x_T.shape
    k, e = term.joint_shape
    extra = token_channels(k * e, h, w)
    base = getattr(model, "in_channels", c)
    wrapped = JointTokenModel(model, term, base, (k, e))
    if c == base + extra:
        return wrapped, x_T
    if c != base:
        raise ValueError(
            f"x_T has {c} channels; the model takes {base} (or {base + extra} with the joint "
            f"tokens packed after them)"
        )
    noise = torch.randn((n, k, e), device=x_T.device, dtype=x_T.dtype)
    return wrapped, torch.cat([x_T, pack_tokens(noise, h, w)], dim=1)
