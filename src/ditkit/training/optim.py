"""Muon on the hidden matrices, AdamW on the rest: one `torch.optim.Optimizer`, exact under FSDP2.

Muon (Keller Jordan, https://kellerjordan.github.io/posts/muon/; Liu et al., "Muon is Scalable
for LLM Training", arXiv 2502.16982) orthogonalises the momentum of each 2-D hidden weight matrix
with a Newton-Schulz iteration; embeddings, the output layer, biases and norms stay on AdamW.
Lightning's automatic optimization drives a single optimizer, so both live here as two groups.

The Muon math is torch's (`torch.optim.Muon`, torch/optim/_muon.py in torch 2.14: its
`_zeropower_via_newtonschulz`, `_adjust_lr` and constants, and the update of
`_single_tensor_muon`); the AdamW math is torch's functional `torch.optim.adamw.adamw`. What is
added is FSDP2 support: Newton-Schulz needs the whole matrix, a sharded DTensor holds some rows.
"""

import re
from collections.abc import Iterable

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor, Replicate
from torch.optim._muon import (
    DEFAULT_A,
    DEFAULT_B,
    DEFAULT_C,
    DEFAULT_NS_STEPS,
    EPS,
    _adjust_lr,
    _zeropower_via_newtonschulz,
)
from torch.optim.adamw import adamw
from torch.optim.optimizer import _get_scalar_dtype
from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

ADJUST_LR_FNS = ("original", "match_rms_adamw", "spectral_unclamped")


def _fused_supported(params: list[Tensor]) -> bool:
    """Whether torch's fused AdamW kernel takes these tensors (torch.optim.Adam's own check):
    floating point on a device with fused kernels (CPU and CUDA both, in torch 2.14)."""
    devices = _get_fused_kernels_supported_devices()
    return all(p.device.type in devices and torch.is_floating_point(p) for p in params)


class Muon(torch.optim.Optimizer):
    """Muon for the 2-D parameters whose name matches `hidden`, AdamW for every other parameter.

    named_params: (name, parameter) pairs, e.g. `list(module.named_parameters())`; names decide the
    split. A parameter joins the Muon group when `re.search(hidden, name)` and it is 2-D (an
    (out, in) weight); the rest (biases, norms, the 4-D patch-embedding conv, the embedders and the
    final layer, which sit outside `model.blocks`) join the AdamW group.

    `param_groups` is always [muon group, adamw group] (either may be empty), each tagged
    `"algorithm": "muon" | "adamw"` and keeping `param_names`. Each group has its own "lr", so an
    LR scheduler scales both from their own base.

    Muon group (torch.optim.Muon's update; momentum 0.95 as in Keller Jordan's post): lr,
    momentum, nesterov, weight_decay (decoupled: p <- p (1 - lr wd)), ns_steps, adjust_lr_fn
    (default "match_rms_adamw": lr * 0.2 sqrt(max(A, B)) for an (A, B) matrix, Moonshot's match of
    AdamW's update RMS, so AdamW's lr and weight decay carry over: hence lr's default is DiT's
    AdamW lr, 1e-4; with adjust_lr_fn="original", Keller Jordan's 0.02 is the usual lr). AdamW
    group: adamw_lr, adamw_betas, adamw_eps, adamw_weight_decay; torch's fused kernel when every
    AdamW tensor supports it (bit for bit `torch.optim.AdamW(fused=True)`), else its foreach one,
    decided here from the tensors' device and dtype (Lightning builds the optimizer after moving the
    model).

    State: `momentum_buffer` (Muon), `step`, `exp_avg`, `exp_avg_sq` (AdamW), per parameter, as
    torch's optimizers, so state_dict() and torch.distributed.checkpoint work unchanged.

    FSDP2: a DTensor parameter keeps its momentum sharded like its gradient (the momentum and the
    Nesterov mix are elementwise, so exact shard by shard); the update is gathered, orthogonalised
    whole on every rank and sliced back to this rank's shard (see `_orthogonalize`).
    """

    def __init__(
        self,
        named_params: Iterable[tuple[str, Tensor]],
        lr: float = 1e-4,
        momentum: float = 0.95,
        nesterov: bool = True,
        weight_decay: float = 0.0,
        ns_steps: int = DEFAULT_NS_STEPS,
        adjust_lr_fn: str | None = "match_rms_adamw",
        adamw_lr: float = 1e-4,
        adamw_betas: tuple[float, float] = (0.9, 0.999),
        adamw_eps: float = 1e-8,
        adamw_weight_decay: float = 0.0,
        hidden: str = r"^model\.blocks\.",
    ) -> None:
        named_params = list(named_params)
        if not named_params:
            raise ValueError("Muon got an empty parameter list")
        for item in named_params:
            if not (
                isinstance(item, tuple | list)
                and len(item) == 2
                and isinstance(item[0], str)
                and isinstance(item[1], Tensor)
            ):
                raise ValueError(
                    "Muon splits parameters by name: pass (name, parameter) pairs, e.g. "
                    f"list(module.named_parameters()), not {type(item).__name__} items"
                )
        if lr < 0 or adamw_lr < 0:
            raise ValueError(f"learning rates must be >= 0, got lr={lr}, adamw_lr={adamw_lr}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if not all(0.0 <= beta < 1.0 for beta in adamw_betas):
            raise ValueError(f"adamw_betas must be in [0, 1), got {adamw_betas}")
        if adjust_lr_fn is not None and adjust_lr_fn not in ADJUST_LR_FNS:
            raise ValueError(f"adjust_lr_fn {adjust_lr_fn!r} is not one of {ADJUST_LR_FNS}")

        pattern = re.compile(hidden)
        is_muon = [bool(pattern.search(n)) and p.ndim == 2 for n, p in named_params]
        muon_named = [item for item, m in zip(named_params, is_muon) if m]
        adamw_named = [item for item, m in zip(named_params, is_muon) if not m]
        adamw_params = [p for _, p in adamw_named]
        # Tensors and names given apart: an empty group still carries `param_names`, which
        # add_param_group requires of every group once one has it.
        muon_group = {
            "params": [p for _, p in muon_named],
            "param_names": [n for n, _ in muon_named],
            "algorithm": "muon",
            "lr": lr,
            "momentum": momentum,
            "nesterov": nesterov,
            "weight_decay": weight_decay,
            "ns_coefficients": (DEFAULT_A, DEFAULT_B, DEFAULT_C),
            "eps": EPS,
            "ns_steps": ns_steps,
            "adjust_lr_fn": adjust_lr_fn,
        }
        adamw_group = {
            "params": adamw_params,
            "param_names": [n for n, _ in adamw_named],
            "algorithm": "adamw",
            "lr": adamw_lr,
            "betas": tuple(adamw_betas),
            "eps": adamw_eps,
            "weight_decay": adamw_weight_decay,
            # Read by Optimizer.load_state_dict: a fused `step` is moved to the parameter's device.
            "fused": _fused_supported(adamw_params),
        }
        super().__init__([muon_group, adamw_group], defaults={})

    @torch.no_grad()
    def step(self, closure=None):
        """One step of each group on the parameters that have a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["algorithm"] == "muon":
                self._muon_step(group)
            else:
                self._adamw_step(group)
        return loss

    def _muon_step(self, group: dict) -> None:
        """torch.optim._muon._single_tensor_muon, the matrix orthogonalised by `_orthogonalize`."""
        for p in group["params"]:
            grad = p.grad
            if grad is None:
                continue
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(
                    grad, memory_format=torch.preserve_format
                )
            buf = state["momentum_buffer"]
            # B_t = mu B_{t-1} + (1 - mu) g_t; Nesterov: g_t + mu (B_t - g_t). Elementwise.
            buf.lerp_(grad, 1 - group["momentum"])
            update = grad.lerp(buf, group["momentum"]) if group["nesterov"] else buf
            update = self._orthogonalize(update, group)
            # A DTensor's .shape is the full matrix's: the lr adjustment sees (A, B), not a shard.
            adjusted_lr = _adjust_lr(group["lr"], group["adjust_lr_fn"], p.shape)
            p.mul_(1 - group["lr"] * group["weight_decay"])
            p.add_(update, alpha=-adjusted_lr)

    def _orthogonalize(self, update: Tensor, group: dict) -> Tensor:
        """Newton-Schulz of the whole (A, B) matrix `update`, returned in its layout, in bf16.

        A plain tensor is orthogonalised as torch.optim.Muon does. A DTensor (any mesh and
        placements, e.g. FSDP2's (Shard(0),) or HSDP's (Replicate(), Shard(0))) is gathered with
        full_tensor(), orthogonalised on every rank alike, and turned back into this rank's shard
        by redistributing a replicated DTensor to the original placements: Replicate -> Shard is a
        local slice by DTensor's torch.chunk rule, which is FSDP2's (uneven last shard included),
        so no communication.
        """
        coefficients, steps, eps = group["ns_coefficients"], group["ns_steps"], group["eps"]
        if not isinstance(update, DTensor):
            return _zeropower_via_newtonschulz(update, coefficients, steps, eps)
        mesh, placements = update.device_mesh, update.placements
        full = _zeropower_via_newtonschulz(update.full_tensor(), coefficients, steps, eps)
        replicated = DTensor.from_local(full, mesh, [Replicate()] * mesh.ndim, run_check=False)
        return replicated.redistribute(mesh, placements)

    def _adamw_step(self, group: dict) -> None:
        """torch.optim.AdamW's step: its lazy state (as Adam._init_group) and its kernel."""
        params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                # A fused kernel reads `step` on the parameter's device; otherwise it stays on CPU.
                if group["fused"]:
                    step = torch.zeros((), dtype=_get_scalar_dtype(is_fused=True), device=p.device)
                else:
                    step = torch.tensor(0.0, dtype=_get_scalar_dtype())
                state["step"] = step
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            params.append(p)
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        beta1, beta2 = group["betas"]
        adamw(
            params,
            grads,
            exp_avgs,
            exp_avg_sqs,
            [],
            steps,
            foreach=not group["fused"],
            fused=group["fused"],
            has_complex=any(torch.is_complex(p) for p in params),
            amsgrad=False,
            beta1=beta1,
            beta2=beta2,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            maximize=False,
        )
