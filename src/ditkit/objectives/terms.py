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


class Term(nn.Module):
    """Base of objective terms. Subclasses set `depths` (the block outputs they read, 1-based) and
    implement `bind` (build parameters for the backbone) and `forward(inputs) -> (N,)`."""

    depths: tuple[int, ...] = ()

    def __init__(self, weight: float = 1.0) -> None:
        super().__init__()
        if weight < 0:
            raise ValueError(f"a term's weight must be >= 0, got {weight}")
        self.weight = float(weight)

    def bind(self, model: nn.Module) -> None:
        """Build the parameters sized for `model` (called once, before the optimizer exists)."""

    def forward(self, inputs: TermInputs) -> torch.Tensor:
        """-> (N,) per-sample values; the objective adds weight * value to the loss."""
        raise NotImplementedError


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
