"""REG: Representation Entanglement for Generation (Wu et al. 2025, arXiv 2507.01467;
Martinser/REG).

REPA plus one more token: the frozen encoder's class token z (DINOv2 `x_norm_clstoken`, width E)
is noised with the image's own t and its own noise, z_t = (1 - t) z + t eps_z, embedded (Linear(E,
D), LayerNorm: `cls_projectors2`, `wg_norm` in models/sit.py SiT.forward) and put before the image
tokens with no position of its own (the reference's zero row of `pos_embed`), denoised jointly
by every block, and read back at position 0 of the last block's output through the final layer's
norm and adaLN modulation (shared with the image, as FinalLayer.forward does) and Linear(D, E)
(`linear_cls`, zero-initialised). Its velocity target is eps_z - z, and the loss is (loss.py
SILoss.__call__, train.py's `--cls` 0.03):

    mse(image) + weight * REPA + cls_weight * mean_E (v_z_pred - (eps_z - z))^2

At sampling the token starts from unit noise and is integrated with the image by the same sampler
and guided with the same scale (samplers.py euler_maruyama_sampler: cls_x_next): see
terms.JointTokenModel. Departures: REPA's loss aligns the image tokens only (the reference's
projector also sees the class token's position); rectified flow with prediction=v and noise_scale=1
only (REG is SiT-based).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ditkit.models.encoders import FrozenEncoder
from ditkit.models.protocol import accepts_prefix

from .alignment import REPA
from .schedule import mean_flat
from .terms import Term, TermInputs, capture_block_outputs


class REG(REPA):
    """REG's term: REPA's projector loss (reported as `<name>`, weight `weight`) and the class
    token's denoising loss (`<name>_cls`, weight `cls_weight`), with the token's embedding and head.

    token_dim: E without an encoder, to build the term for sampling only (evaluate.py reads it from
    the checkpoint); training needs the encoder."""

    used_in_sampling = True
    adds_joint_tokens = True

    def __init__(
        self,
        encoder: FrozenEncoder | None,
        depth: int = 8,
        weight: float = 0.5,
        cls_weight: float = 0.03,
        projector_dim: int = 2048,
        token_dim: int | None = None,
    ) -> None:
        if encoder is None and token_dim is not None:  # sampling only: no teacher, no loss
            Term.__init__(self, weight)
            if depth < 1:
                raise ValueError(f"alignment.depth counts blocks from 1, got {depth}")
            self.encoder, self.depths = None, (int(depth),)
            self.projector_dim = int(projector_dim)
        else:
            super().__init__(encoder, depth, weight, projector_dim)
        if cls_weight < 0:
            raise ValueError(f"alignment.cls_weight must be >= 0, got {cls_weight}")
        self.cls_weight = float(cls_weight)
        self.repa_depth = int(depth)
        self.token_dim = int(token_dim) if encoder is None else encoder.dim
        self.joint_shape = (1, self.token_dim)  # one class token of width E
        self._features = None

    def bind(self, model: nn.Module) -> None:
        if not accepts_prefix(model):
            raise ValueError(
                f"REG (alignment=reg) puts the encoder's class token before the image tokens, "
                f"which {type(model).__name__} does not take: it lacks the optional "
                "`accepts_prefix` capability (ditkit.models.protocol.OPTIONAL). Use a DiT / SiT "
                "backbone (model=dit), or alignment=repa"
            )
        if self.encoder is not None:
            super().bind(model)  # the grid check and REPA's projector
        else:
            self.grid = int(model.input_size) // int(model.patch_size)
            self.build_projector(int(model.hidden_size), self.token_dim)
        d, e = int(model.hidden_size), self.token_dim
        self.embed = nn.Sequential(nn.Linear(e, d), nn.LayerNorm(d, eps=1e-6))
        # The final layer's norm (models/sit.py FinalLayer.norm_final) and linear_cls, zero-init.
        self.norm = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.head = nn.Linear(d, e)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.last = len(model.blocks)
        self.depths = tuple(sorted({self.repa_depth, self.last}))
        final = getattr(model, "final_layer", None)
        # Shared modulation when the backbone's final layer has one (DiT's FinalLayer).
        self.shares_modulation = hasattr(final, "adaLN_modulation")

    # ------------------------------------------------------------------ the encoder, once a step
    def features(self, batch: Mapping[str, torch.Tensor]):
        """The encoder's features of the batch's images, computed once for both parts."""
        image = batch.get("image") if isinstance(batch, Mapping) else None
        if self._features is None or self._features[0] is not image:
            if self.encoder is None:
                raise RuntimeError("this REG term was built for sampling only (no encoder)")
            self.teacher_check(batch)
            self._features = (image, self.encoder(image))
        return self._features[1]

    def teacher_check(self, batch) -> None:
        if "image" not in batch:
            super().teacher(batch)  # raises REPA's error naming keep_images=true

    def teacher(self, batch) -> torch.Tensor:
        from ditkit.models.encoders import match_grid

        return match_grid(self.features(batch).patches, self.grid)

    def joint_tokens(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """(N, 1, E) float32: the encoder's class token of the clean image."""
        return self.features(batch).cls.unsqueeze(1)

    # ------------------------------------------------------------------ the joint forward
    def joint_forward(self, model, x, t, condition, tokens_t, depths=()):
        """model(x, t, **condition, prefix=embed(tokens_t)) -> (output, velocity (N, K, E),
        {depth: block output}); block outputs keep the prefix (REPA reads the last T tokens)."""
        prefix = self(tokens_t, part="embed")
        store: dict[str, torch.Tensor] = {}
        handle = None
        if self.shares_modulation:

            def keep(module, args, output) -> None:
                store["modulation"] = output  # (N, 2D): shift, scale of the image's final layer

            handle = model.final_layer.adaLN_modulation.register_forward_hook(keep)
        try:
            with capture_block_outputs(model, tuple(sorted({*depths, self.last}))) as hidden:
                output = model(x, t, **condition, prefix=prefix)
        finally:
            if handle is not None:
                handle.remove()
        head_input = hidden[self.last][:, : tokens_t.shape[1]]  # the prefix comes first
        velocity = self((head_input, store.get("modulation")), part="head")
        return output, velocity, dict(hidden)

    def _embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """(N, K, E) noisy tokens -> (N, K, D) prefix tokens."""
        return self.embed(tokens.to(self.embed[0].weight.dtype))

    def _head(self, h: torch.Tensor, modulation: torch.Tensor | None) -> torch.Tensor:
        """(N, K, D) last-block prefix outputs, (N, 2D) final-layer modulation -> (N, K, E)."""
        h = self.norm(h)
        if modulation is not None:
            shift, scale = modulation.chunk(2, dim=-1)
            h = h * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)
        return self.head(h)

    # ------------------------------------------------------------------ losses
    def forward(self, inputs, part: str = "loss"):
        """part "loss": TermInputs -> {"": REPA (N,), "cls": the token's mse (N,)}; "embed" and
        "head" are the joint forward's two ends, called through the module so that FSDP2 gathers
        the parameters."""
        if part == "embed":
            return self._embed(inputs)
        if part == "head":
            return self._head(*inputs)
        if not isinstance(inputs, TermInputs) or inputs.joint is None:
            raise RuntimeError(
                "REG's loss needs the objective's joint token forward (objective=flow)"
            )
        pred, target = inputs.joint
        dtype = torch.promote_types(pred.dtype, torch.float32)
        cls = mean_flat((pred.to(dtype) - target.to(dtype)) ** 2)
        losses = {"cls": cls}
        losses[""] = super().forward(inputs) if self.weight > 0 else torch.zeros_like(cls)
        self._features = None  # the step is over: do not hold the batch's features
        return losses

    def part_weights(self) -> dict[str, float]:
        return {"": self.weight, "cls": self.cls_weight}

    @classmethod
    def sampling_overrides(cls, state: Mapping[str, torch.Tensor]) -> dict:
        """No encoder; E from the saved head's shape."""
        return {"encoder": None, "token_dim": int(state["head.weight"].shape[0])}
