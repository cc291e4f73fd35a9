"""Pure functions behind the Gaussian diffusion objective: noise schedules, timestep
respacing, and the Gaussian KL / discretised likelihood of the variational bound.

Everything that defines a schedule is computed in float64 (as in Ho et al. 2020 and the
DiT reference) and only cast to float32 when a sampler or loss reads it.
"""

from __future__ import annotations

import math

import torch

SCHEDULES = ("linear", "cosine")


def beta_schedule(name: str, num_timesteps: int) -> torch.Tensor:
    """betas: (T,) float64 for schedule `name` over `num_timesteps` steps."""
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
    if name == "linear":
        # Ho et al. 2020, sec. 4: 1e-4 .. 0.02 over 1000 steps; scaled so that another T
        # gives the same total noise (Nichol & Dhariwal 2021, improved DDPM).
        scale = 1000.0 / num_timesteps
        return torch.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=torch.float64)
    if name == "cosine":
        # Nichol & Dhariwal 2021, eq. 17: alpha_bar(t) = cos^2((t/T + s) / (1 + s) * pi/2), s=0.008,
        # betas clipped at 0.999 to avoid a singularity at t = T.
        def alpha_bar(u: float) -> float:
            return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = [
            min(1.0 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), 0.999)
            for i in range(num_timesteps)
        ]
        return torch.tensor(betas, dtype=torch.float64)
    raise ValueError(f"unknown noise schedule {name!r}; choose one of {', '.join(SCHEDULES)}")


def space_timesteps(num_timesteps: int, spec: str | int) -> list[int]:
    """The original timesteps kept by a respacing `spec`, sorted ascending.

    spec "ddimN": an even stride i with len(range(0, T, i)) == N (DDIM, Song et al. 2021).
    spec "a,b,c": split [0, T) into equal sections and keep a, b, c evenly spaced (rounded)
    steps in each, ends included (improved DDPM, sec. 4). "250" is one section of 250 steps.
    """
    spec = str(spec).strip()
    if spec.startswith("ddim"):
        try:
            count = int(spec[len("ddim") :])
        except ValueError:
            raise ValueError(
                f"bad respacing {spec!r}: expected 'ddimN' with an integer N"
            ) from None
        for stride in range(1, num_timesteps):
            if len(range(0, num_timesteps, stride)) == count:
                return list(range(0, num_timesteps, stride))
        raise ValueError(
            f"respacing {spec!r}: no integer stride gives exactly {count} of {num_timesteps} steps; "
            f"pick another count or an evenly spaced spec such as '{count}'"
        )
    try:
        counts = [int(c) for c in spec.split(",")]
    except ValueError:
        raise ValueError(
            f"bad respacing {spec!r}: expected 'ddimN', 'N' or comma-separated counts like '10,10,5'"
        ) from None
    size_per, extra = divmod(num_timesteps, len(counts))
    kept: list[int] = []
    start = 0
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if not 1 <= count <= size:
            raise ValueError(
                f"respacing {spec!r}: section {i} has {size} steps, cannot keep {count} (need 1..{size})"
            )
        stride = 1.0 if count == 1 else (size - 1) / (count - 1)
        # Accumulate the fractional index (rather than j * stride) so that ties round exactly
        # as in the reference, which keeps released checkpoints' sampling grids bit-identical.
        position = 0.0
        for _ in range(count):
            kept.append(start + round(position))
            position += stride
        start += size
    return sorted(set(kept))


def respaced_betas(alphas_cumprod: torch.Tensor, kept: list[int]) -> torch.Tensor:
    """betas: (len(kept),) float64 of the process that visits only `kept` steps.

    Chosen so the respaced alpha_bar equals the original at every kept step
    (improved DDPM, sec. 4: beta_t = 1 - alpha_bar_t / alpha_bar_{t_prev}).
    """
    betas, last = [], 1.0
    for i in kept:
        betas.append(1.0 - float(alphas_cumprod[i]) / last)
        last = float(alphas_cumprod[i])
    return torch.tensor(betas, dtype=torch.float64)


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats."""
    return 0.5 * (
        -1.0
        + logvar2
        - logvar1
        + torch.exp(logvar1 - logvar2)
        + (mean1 - mean2) ** 2 * torch.exp(-logvar2)
    )


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """Phi(x) by the tanh approximation used for the decoder term (Ho et al. 2020, sec. 3.3)."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x, means, log_scales) -> torch.Tensor:
    """log p(x) elementwise for data quantised to 256 bins in [-1, 1] (Ho et al. 2020, eq. 13);
    the two edge bins extend to -inf / +inf. x, means, log_scales: same shape."""
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(
        x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta)
    )


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """(N, ...) -> (N,): mean over every dimension but the batch."""
    return x.mean(dim=tuple(range(1, x.ndim)))
