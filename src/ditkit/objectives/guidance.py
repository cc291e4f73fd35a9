"""Classifier-free guidance (Ho & Salimans 2022), the one implementation every sampler uses.

The conditional and the null-condition batch go through the model as ONE batch of 2N, and the
prediction becomes  uncond + scale * (cond - uncond)  (Ho & Salimans, eq. 6). The null condition is
the backbone's own (`model.null_condition(**condition)`: DiT's null class, MMDiT's zero text), so
guidance works for any backbone that meets the contract. Options beyond the paper:
- `channels`: guide only the first k output channels. The DiT reference guides the first 3
  of its 4 latent channels (a quirk of its `forward_with_cfg`); k=3 reproduces it.
  Channels past k -- and a learned-variance half -- are taken from the conditional output.
- `interval`: guide only while the objective's time lies in [low, high] (Kynkaenniemi et al.
  2024, "Applying guidance in a limited interval"; used by LightningDiT and REPA). Outside
  it the model runs on the N conditional samples only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

Model = Callable[..., torch.Tensor]


def guide(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """uncond + scale * (cond - uncond): scale 1 is the conditional model, 0 the unconditional."""
    return uncond + scale * (cond - uncond)


def _double(value: Any, n: int) -> Any:
    """Repeat a per-sample keyword (leading dim n) for the doubled batch; leave others as they
    are."""
    if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == n:
        return torch.cat([value, value])
    return value


@dataclass(frozen=True)
class Guidance:
    """A resolved guidance setting; `scale == 1` means no guidance (one batch of N)."""

    scale: float = 1.0
    channels: int | None = None
    interval: tuple[float, float] | None = None

    @classmethod
    def build(
        cls,
        model: Any,
        model_kwargs: dict | None,
        cfg_scale: float = 1.0,
        guidance_channels: int | None = None,
        guidance_interval: Sequence[float] | None = None,
    ) -> Guidance:
        """Validate the options before the first model call: the model must name its condition and
        give its null, and the condition must be in `model_kwargs`."""
        cfg_scale = float(cfg_scale)
        if cfg_scale == 1.0:
            return cls()
        keys = getattr(model, "condition_keys", None)
        if keys is None or not hasattr(model, "null_condition"):
            raise ValueError(
                f"cfg_scale={cfg_scale} needs a model with `condition_keys` and `null_condition` "
                "(the Backbone contract, docs/extending.md), or cfg_scale=1.0"
            )
        missing = [k for k in keys if k not in (model_kwargs or {})]
        if missing:
            raise ValueError(
                f"cfg_scale={cfg_scale} guides toward a condition, but model_kwargs lacks "
                f"{missing} (the model takes {list(keys)}); pass them, or cfg_scale=1.0"
            )
        if guidance_channels is not None and int(guidance_channels) < 1:
            raise ValueError(
                f"guidance_channels must be None (all) or >= 1, got {guidance_channels}"
            )
        interval = None
        if guidance_interval is not None:
            if len(guidance_interval) != 2 or float(guidance_interval[0]) > float(
                guidance_interval[1]
            ):
                raise ValueError(
                    f"guidance_interval must be (low, high) with low <= high, got "
                    f"{guidance_interval}"
                )
            interval = (float(guidance_interval[0]), float(guidance_interval[1]))
        channels = None if guidance_channels is None else int(guidance_channels)
        return cls(scale=cfg_scale, channels=channels, interval=interval)

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
        null = model.null_condition(**{key: kwargs[key] for key in model.condition_keys})
        doubled = {
            key: torch.cat([value, null[key]]) if key in null else _double(value, n)
            for key, value in kwargs.items()
        }
        out = model(torch.cat([x, x]), torch.cat([t, t]), **doubled)
        cond, uncond = out[:n], out[n:]
        guided = guide(cond[:, :k], uncond[:, :k], self.scale)
        return torch.cat([guided, cond[:, k:]], dim=1)
