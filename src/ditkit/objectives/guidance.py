"""Classifier-free guidance (Ho & Salimans 2022), shared by every sampler of both objectives.

The conditional and the null-label batch go through the model as ONE batch of 2N, and the
prediction becomes  uncond + scale * (cond - uncond).  Options beyond the paper:
- `channels`: guide only the first k output channels. The DiT reference guides the first 3
  of its 4 latent channels (a quirk of its `forward_with_cfg`); k=3 reproduces it.
  Channels past k -- and a learned-variance half -- are taken from the conditional output.
- `interval`: guide only while the objective's time lies in [low, high] (Kynkaenniemi et al.
  2024, "Applying guidance in a limited interval"; used by LightningDiT and REPA). Outside
  it the model runs on the N conditional samples only.
Text-conditional models (MMDiT: model_kwargs {"context", "pooled"}, no "y") define their null
condition themselves: `model.null_condition(**model_kwargs)` gives the keywords of the null half.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

Model = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class Guidance:
    """A resolved guidance setting; `scale == 1` means no guidance (one batch of N)."""

    scale: float = 1.0
    null_label: int | None = None
    null_kwargs: dict | None = None  # the null half's keywords, for a model with `null_condition`
    channels: int | None = None
    interval: tuple[float, float] | None = None

    @classmethod
    def build(
        cls,
        model: Any,
        model_kwargs: dict | None,
        cfg_scale: float,
        guidance_channels: int | None,
        guidance_interval: tuple[float, float] | list[float] | None,
        null_label: int | None,
    ) -> Guidance:
        """Validate the user's options early and find the null label (argument, else
        `model.num_classes`, the DiT convention for the extra 'no class' embedding), or, without
        labels, the null condition of a model that has `null_condition` (text conditioning)."""
        cfg_scale = float(cfg_scale)
        if cfg_scale == 1.0:
            return cls()
        null_kwargs = None
        if model_kwargs and model_kwargs.get("y") is None and hasattr(model, "null_condition"):
            null_kwargs = dict(model.null_condition(**model_kwargs))
        elif not model_kwargs or model_kwargs.get("y") is None:
            raise ValueError(
                f"cfg_scale={cfg_scale} needs class labels: pass model_kwargs={{'y': labels}} "
                "(or a text condition to a model with `null_condition`, or cfg_scale=1.0 for an unconditional model)"
            )
        if null_kwargs is None and null_label is None:
            null_label = getattr(model, "num_classes", None)
            if null_label is None:
                raise ValueError(
                    "classifier-free guidance needs the null class: pass null_label=..., "
                    "or give the model a `num_classes` attribute (the null class is index num_classes)"
                )
        if guidance_channels is not None and int(guidance_channels) < 1:
            raise ValueError(
                f"guidance_channels must be None (all) or >= 1, got {guidance_channels}"
            )
        if guidance_interval is not None:
            if len(guidance_interval) != 2 or float(guidance_interval[0]) > float(
                guidance_interval[1]
            ):
                raise ValueError(
                    f"guidance_interval must be (low, high) with low <= high, got {guidance_interval}"
                )
            guidance_interval = (float(guidance_interval[0]), float(guidance_interval[1]))
        return cls(
            scale=cfg_scale,
            null_label=None if null_kwargs is not None else int(null_label),
            null_kwargs=null_kwargs,
            channels=None if guidance_channels is None else int(guidance_channels),
            interval=guidance_interval,
        )

    def active(self, time: float) -> bool:
        """Whether guidance applies at objective time `time` (a Python number: no device sync)."""
        if self.scale == 1.0:
            return False
        return self.interval is None or self.interval[0] <= time <= self.interval[1]

    def __call__(
        self,
        model: Model,
        x: torch.Tensor,
        t: torch.Tensor,
        model_kwargs: dict | None,
        time: float,
        pred_channels: int,
    ) -> torch.Tensor:
        """Model output at one step, guided when active.

        x: (N, C, H, W); t: (N,) the timesteps the model sees; time: the objective's time of
        this step; pred_channels: how many leading output channels are the prediction (C;
        a learned variance follows them). Returns (N, C_out, H, W).
        """
        kwargs = dict(model_kwargs or {})
        if not self.active(time):
            return model(x, t, **kwargs)
        k = pred_channels if self.channels is None else self.channels
        if k > pred_channels:
            raise ValueError(
                f"guidance_channels={k} exceeds the {pred_channels} prediction channels of the model"
            )
        n = x.shape[0]
        if self.null_kwargs is not None:
            doubled = {
                key: torch.cat([v, self.null_kwargs[key]])
                if key in self.null_kwargs
                else _double(v, n)
                for key, v in kwargs.items()
            }
            out = model(torch.cat([x, x]), torch.cat([t, t]), **doubled)
        else:
            y = kwargs.pop("y")
            doubled = {key: _double(v, n) for key, v in kwargs.items()}
            out = model(
                torch.cat([x, x]),
                torch.cat([t, t]),
                y=torch.cat([y, torch.full_like(y, self.null_label)]),
                **doubled,
            )
        cond, uncond = out[:n], out[n:]
        guided = uncond[:, :k] + self.scale * (cond[:, :k] - uncond[:, :k])
        return torch.cat([guided, cond[:, k:]], dim=1)


def _double(value: Any, n: int) -> Any:
    """Repeat a per-sample keyword (leading dim n) for the doubled batch; leave others as they are."""
    if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == n:
        return torch.cat([value, value])
    return value
