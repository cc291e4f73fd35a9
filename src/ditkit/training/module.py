"""The LightningModule: a backbone trained with an objective.

One optimizer step here is: seed the global RNG from (seed, step, micro-batch, rank) so every
random draw (t, noise, label dropout) replays exactly after a resume; the objective's losses on the
batch dict; backward; one all-reduce of [loss parts, non-finite count, squared grad norm] so every
rank takes the same decision; skip the step when anything was NaN/Inf (counted, fatal after
`max_consecutive_skips`); clip; the optimizer; EMA update.

What is trained is the backbone plus every module the objective owns (`trainable_modules()`, e.g. an
alignment projector): one optimizer, one global norm, one NaN check, one checkpoint and one exact
resume for all of it. The module never looks inside the batch: the objective reads its fields.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torch.distributed.tensor import DTensor

from ditkit.models.protocol import check_backbone
from ditkit.objectives.protocol import check_objective

from .ema import ema_decay, local, make_shadow, update_ema
from .fp8 import check_fp8, convert_fp8
from .parallel import checkpoint_blocks, compile_blocks, fsdp_mesh, replicas, reshard, shard_blocks

# DiT's optimizer (Peebles & Xie 2023, sec. 5): AdamW, lr 1e-4, no weight decay. fused: one kernel
# for the whole update, 3x faster than the default foreach AdamW on CPU (DiT-S/2: 30 vs 103 ms).
DEFAULT_OPTIMIZER = partial(
    torch.optim.AdamW, lr=1e-4, betas=(0.9, 0.999), weight_decay=0.0, eps=1e-8, fused=True
)

OptimizerFactory = Callable[[list[tuple[str, nn.Parameter]]], torch.optim.Optimizer]
ScheduleFactory = Callable[[torch.optim.Optimizer], Any]


def step_seed(seed: int, step: int, micro: int, rank: int) -> int:
    """A well-mixed 63-bit seed for one micro-batch of one rank (numpy's SeedSequence hashing)."""
    state = np.random.SeedSequence([seed, step, micro, rank]).generate_state(1, np.uint64)
    return int(state[0] >> 1)


class NonFiniteLossError(FloatingPointError):
    """Raised after too many optimizer steps in a row had a NaN/Inf loss or gradient."""


class DiffusionModule(L.LightningModule):
    """Backbone + objective + optimizer + EMA.

    model: a `ditkit.models.Backbone` (checked here). objective: a `ditkit.objectives.Objective`
        (checked here); `objective.bind(model)` builds the modules it owns, trained with the model.
    optimizer: called with the module's named trainable parameters [(name, parameter), ...]
        (names "model.*" and "objective_modules.<name>.*"); default DiT's fused AdamW. Config
        group `optimizer=adamw|muon`. lr_schedule: called with the optimizer, returns a per-step
        scheduler or None (config group `lr_schedule=`); default None, a constant lr.
    ema_decay: EMA decay per optimizer step (DiT: 0.9999). ema_warmup: use
        min(decay, (1 + n) / (10 + n)) so that short runs are not dominated by the initial weights.
    ema_objective_modules: keep an EMA of the objective's modules too (default: the backbone only;
        sampling needs only the backbone).
    extra_ema: more EMAs of the backbone, {name: decay} (JiT keeps 0.9999 and 0.9996): each is
        updated like `ema` (same warmup rule), sharded like it under FSDP2 and saved as
        `extra_ema.<name>.*`; `evaluate.py ema=<name>` samples with one.
    compile: torch.compile each block. activation_checkpointing: recompute each block's
        activations in the backward (DiT, MMDiT and U-Net alike). seed: base of the per-step seeds.
    fp8: the blocks' linear layers in FP8 (torchao float8 training, rowwise scaling; training/fp8.py):
        GPU with FP8 tensor cores, module.compile=true and bf16-mixed only, refused elsewhere.
    max_consecutive_skips: stop with an error after this many non-finite steps in a row.
    run_config: the run's resolved config (plain dict), stored in every checkpoint under
        "ditkit_config" so evaluate.py can rebuild the model and objective from the file alone.
    Gradient clipping is the Trainer's `gradient_clip_val` (norm only), applied to the norm
    computed here, which is the true global norm under DDP and FSDP2 alike.
    """

    def __init__(
        self,
        model: nn.Module,
        objective: Any,
        optimizer: OptimizerFactory | None = None,
        lr_schedule: ScheduleFactory | None = None,
        ema_decay: float = 0.9999,
        ema_warmup: bool = False,
        ema_objective_modules: bool = False,
        extra_ema: dict[str, float] | None = None,
        compile: bool = False,
        activation_checkpointing: bool = False,
        fp8: bool = False,
        seed: int = 0,
        max_consecutive_skips: int = 10,
        run_config: dict | None = None,
    ):
        super().__init__()
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"module.ema_decay must lie in [0, 1), got {ema_decay}")
        if max_consecutive_skips < 1:
            raise ValueError(
                f"module.max_consecutive_skips must be >= 1, got {max_consecutive_skips}"
            )
        extra_ema = dict(extra_ema or {})
        for name, decay in extra_ema.items():
            if not name.isidentifier() or name in ("ema", "raw"):
                raise ValueError(
                    f"module.extra_ema name {name!r} must be an identifier other than ema / raw"
                )
            if not 0.0 <= decay < 1.0:
                raise ValueError(f"module.extra_ema.{name} must lie in [0, 1), got {decay}")
        check_backbone(model)
        check_objective(objective)
        if fp8:
            check_fp8(compile)
        if activation_checkpointing and getattr(objective, "forward_mode_ad", False):
            # torch.utils.checkpoint's recomputation saves other tensors than a forward-mode (JVP)
            # forward did ("A different number of tensors was saved"), so it cannot wrap one yet.
            raise ValueError(
                f"objective={objective.name} differentiates the model in forward mode (a JVP), "
                "which module.activation_checkpointing=true does not support yet: set it to false"
            )
        self.model = model
        self.objective = objective
        self.ema = make_shadow(model)
        self.extra_ema = nn.ModuleDict({name: make_shadow(model) for name in extra_ema})
        self.extra_ema_decays = extra_ema
        objective.bind(model)
        # Registered here, so they are in the optimizer, the checkpoint and the FSDP2 sharding; the
        # objective keeps using the very same module objects.
        self.objective_modules = nn.ModuleDict(objective.trainable_modules())
        self.ema_objective = nn.ModuleDict(
            {k: make_shadow(m) for k, m in self.objective_modules.items()}
            if ema_objective_modules
            else {}
        )
        # Buffers, so they travel in every checkpoint (replicated, not sharded, under FSDP2).
        self.register_buffer("ema_updates", torch.zeros((), dtype=torch.int64))
        self.register_buffer("skipped_steps", torch.zeros((), dtype=torch.int64))
        self.optimizer_factory = optimizer or DEFAULT_OPTIMIZER
        self.lr_schedule_factory = lr_schedule
        self.ema_decay = ema_decay
        self.ema_warmup = ema_warmup
        self.compile_blocks = compile
        self.activation_checkpointing = activation_checkpointing
        self.fp8 = fp8
        self.seed = seed
        self.max_consecutive_skips = max_consecutive_skips
        self.run_config = run_config
        self._configured = False
        self._consecutive_skips = 0
        self._step_taken = False
        self._reset_stats()

    # ---------------------------------------------------------------- what is trained
    def named_trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """(name, parameter) of the backbone, then of the objective's modules (the EMA takes
        none)."""
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad]

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        return (p for _, p in self.named_trainable_parameters())

    def _ema_pairs(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(shadow parameters, trained parameters), matched one to one."""
        shadows, sources = list(self.ema.parameters()), list(self.model.parameters())
        for key, shadow in self.ema_objective.items():
            shadows += list(shadow.parameters())
            sources += list(self.objective_modules[key].parameters())
        return shadows, sources

    # ---------------------------------------------------------------- setup
    def configure_model(self) -> None:
        """FSDP2 (ModelParallelStrategy gives a device mesh): shard each block, then the root, of
        the model and of its EMA alike, so their local shards line up, and each objective module;
        then compile the blocks and wrap them in activation checkpointing, all from outside the
        model."""
        if self._configured:
            return
        self._configured = True
        if self.fp8:  # before sharding and compiling, as torchao asks
            check_fp8(self.compile_blocks, self.trainer.precision)
            convert_fp8(self.model)
        if self.device_mesh is not None:
            from torch.distributed.fsdp import fully_shard

            mesh = fsdp_mesh(self.device_mesh)  # 1-D (FSDP2) or 2-D (HSDP)
            shard_blocks(self.model, mesh)
            for shadow in (self.ema, *self.extra_ema.values()):
                shard_blocks(shadow, mesh)
            for modules in (self.objective_modules, self.ema_objective):
                for module in modules.values():
                    if any(True for _ in module.parameters()):
                        fully_shard(module, mesh=mesh)
        if self.compile_blocks:
            compile_blocks(self.model)
        if self.activation_checkpointing:
            checkpoint_blocks(self.model)

    def on_fit_start(self) -> None:
        # "bf16-true" / "16-true" convert the whole LightningModule; the EMA must stay an fp32
        # average.
        for shadow in (self.ema, *self.extra_ema.values(), *self.ema_objective.values()):
            if any(p.dtype != torch.float32 for p in shadow.parameters()):
                shadow.float()

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(self.named_trainable_parameters())
        schedule = self.lr_schedule_factory(optimizer) if self.lr_schedule_factory else None
        if schedule is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    # ---------------------------------------------------------------- step
    def _reset_stats(self) -> None:
        self._stats: dict[str, torch.Tensor] = {}
        self._micro_batches = 0
        self._nonfinite = None

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        """batch: the loader's dict ({"x": (B, C, H, W), "y": (B,)} or text fields, plus whatever
        else the objective reads), handed to the objective untouched -> mean loss."""
        micro = batch_idx % self.trainer.accumulate_grad_batches
        # Every draw of this micro-batch is a function of (seed, step, micro, rank): an interrupted
        # and resumed run replays the uninterrupted run's t / noise / label-dropout draws exactly.
        torch.manual_seed(step_seed(self.seed, self.global_step, micro, self.global_rank))
        terms = self.objective.training_losses(self.model, batch)
        loss = terms["loss"].mean()
        for name, value in terms.items():
            value = value.detach().float().mean()
            self._stats[name] = self._stats[name] + value if name in self._stats else value
        bad = (~torch.isfinite(loss.detach())).float()
        self._nonfinite = bad if self._nonfinite is None else self._nonfinite + bad
        self._micro_batches += 1
        return loss

    def on_before_optimizer_step(self, optimizer) -> None:
        """After backward (grads complete and, under DDP, averaged), before clipping and the
        step."""
        params = [p for p in self.trainable_parameters() if p.grad is not None]
        grads = [local(p.grad) for p in params]
        if grads:
            sq = torch.stack(torch._foreach_norm(grads)).float().pow(2).sum()
        else:
            sq = torch.zeros((), device=self.device)
        names = list(self._stats)
        vec = torch.stack(
            [*(self._stats[n] for n in names), self._nonfinite.to(sq.device), sq.to(sq.device)]
        )
        world = self.trainer.world_size
        if world > 1 and dist.is_available() and dist.is_initialized():
            # One collective decides for every rank: a NaN on any rank skips the step on all of them
            # (a rank that skipped alone would desynchronise the replicas or hang the next
            # collective).
            dist.all_reduce(vec, op=dist.ReduceOp.SUM)
        vec = vec.cpu()
        # DDP grads are replicas (each rank holds the full averaged gradient); FSDP2 grads are
        # disjoint shards; HSDP's shards are held once per replica group.
        sharded = any(isinstance(p.grad, DTensor) for p in params)
        grad_norm = math.sqrt(vec[-1].item() / (replicas(self.device_mesh) if sharded else world))
        ok = vec[-2].item() == 0 and math.isfinite(grad_norm)
        self._grad_norm = grad_norm
        self._step_taken = ok
        means = {
            f"train/{n}": vec[i].item() / (world * self._micro_batches) for i, n in enumerate(names)
        }
        if ok:
            self._consecutive_skips = 0
        else:
            # Dropping the gradients makes the optimizer skip every parameter: no moment, step-count
            # or weight change, so the weights (and the EMA, updated only after a taken step) stay.
            for p in params:
                p.grad = None
            self.skipped_steps += 1
            self._consecutive_skips += 1
        # One lr per algorithm when the optimizer tags its groups (Muon: muon and adamw groups).
        lrs = {
            f"train/lr_{g['algorithm']}": g["lr"]
            for g in optimizer.param_groups
            if "algorithm" in g
        }
        self.log_dict(
            {
                **means,
                "train/grad_norm": grad_norm,
                "train/lr": optimizer.param_groups[0]["lr"],
                **lrs,
                "train/skipped_steps": float(self.skipped_steps.item()),
            },
            on_step=True,
            on_epoch=False,
        )
        self.log(
            "loss", means["train/loss"], prog_bar=True, logger=False, on_step=True, on_epoch=False
        )
        self._reset_stats()
        if self._consecutive_skips >= self.max_consecutive_skips:
            raise NonFiniteLossError(
                f"{self._consecutive_skips} optimizer steps in a row (up to step "
                f"{self.global_step}) had a NaN/Inf loss or gradient; they were skipped, so the "
                "weights and the last checkpoint are still the last good ones. Resume from it with "
                "a lower optimizer.lr, gradient clipping (trainer.gradient_clip_val=1.0), or a "
                "warm-up (lr_schedule.warmup_steps=1000), or raise module.max_consecutive_skips."
            )

    def configure_gradient_clipping(
        self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None
    ) -> None:
        """Clip by the global norm computed in on_before_optimizer_step (no second reduction)."""
        if gradient_clip_val is None or not self._step_taken:
            return
        if gradient_clip_algorithm not in (None, "norm"):
            raise ValueError(
                "ditkit clips by norm only: set trainer.gradient_clip_algorithm=norm (or leave it "
                "unset)"
            )
        coef = gradient_clip_val / (self._grad_norm + 1e-6)
        if coef < 1.0:
            grads = [local(p.grad) for p in self.trainable_parameters() if p.grad is not None]
            torch._foreach_mul_(grads, coef)

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        if self._step_taken:
            decay = ema_decay(self.ema_decay, int(self.ema_updates.item()), self.ema_warmup)
            reshard(self.ema)  # sampling callbacks run forwards on it between steps
            update_ema(*self._ema_pairs(), decay)
            n = int(self.ema_updates.item())
            for name, shadow in self.extra_ema.items():
                reshard(shadow)
                decay = ema_decay(self.extra_ema_decays[name], n, self.ema_warmup)
                update_ema(list(shadow.parameters()), list(self.model.parameters()), decay)
            self.ema_updates += 1

    # ---------------------------------------------------------------- sampling and checkpoints
    def sampling_terms(self, use_ema: bool = True) -> dict[str, nn.Module]:
        """{name: module} of the objective's terms sampling needs (REG's token embedding and
        head; `used_in_sampling`): their EMA with module.ema_objective_modules=true and use_ema,
        else the trained ones. Empty for most runs."""
        return {
            key: self.ema_objective[key]
            if use_ema and key in self.ema_objective
            else self.objective_modules[key]
            for key, term in self.objective_modules.items()
            if getattr(term, "used_in_sampling", False)
        }

    @torch.no_grad()
    def sample(
        self,
        noise: torch.Tensor,
        condition: dict[str, Any],
        *,
        sampler: str | None = None,
        steps: int | str | None = None,
        cfg_scale: float = 1.0,
        guidance_channels: int | None = None,
        use_ema: bool = True,
        **options: Any,
    ) -> torch.Tensor:
        """x_0: (N, C, H, W) from noise: (N, C, H, W) and the model's condition ({"y": (N,)} or
        text fields), with the EMA weights by default and a registered sampler.

        Under FSDP2 every rank must call this together (the forward all-gathers the shards)."""
        net = self.ema if use_ema else self.model
        terms = self.sampling_terms(use_ema)
        if terms:
            options["terms"] = terms
        nets = [net, *options.get("terms", {}).values()]
        was_training = [m.training for m in nets]
        for m in nets:
            m.eval()
        try:
            return self.objective.sample(
                net,
                noise,
                model_kwargs=condition,
                sampler=sampler,
                steps=steps,
                cfg_scale=cfg_scale,
                guidance_channels=guidance_channels,
                **options,
            )
        finally:
            for m, mode in zip(nets, was_training, strict=True):
                m.train(mode)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        step, max_steps = checkpoint.get("global_step", 0), self.trainer.max_steps
        if 0 < max_steps <= step:
            rank_zero_info(
                f"ditkit: this run already reached step {step} (trainer.max_steps={max_steps}): "
                "nothing to train; raise trainer.max_steps to train longer"
            )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.run_config is not None:
            checkpoint["ditkit_config"] = self.run_config
