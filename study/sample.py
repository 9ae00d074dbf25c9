"""Sampling: a Karras sigma schedule, the Euler (DDIM) sampler, and sampling progress p.

Written in k-diffusion's style: a denoiser ``denoise(x, sigma, p) -> D`` and flat
functions. ``p`` is progress on the sigma schedule in ComfyUI's percent convention
for continuous-EDM models (``percent_to_sigma``): 0 at ``sigma_max``, 1 at
``sigma_min``, linear in log sigma. The omega schedules of ``guidance.omega_at`` take it.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

Denoise = Callable[[Tensor, float, float], Tensor]


def karras_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """Karras et al. (2022), eq. 5: ``steps`` noise levels from sigma_max down to sigma_min, then 0."""
    ramp = torch.linspace(0, 1, steps)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (hi + ramp * (lo - hi)) ** rho
    return torch.cat([sigmas, torch.zeros(1)])


def progress(sigma: float, sigma_min: float, sigma_max: float) -> float:
    """p such that ComfyUI's EDM ``percent_to_sigma(p)`` is ``sigma``, clipped to [0, 1]."""
    p = 1.0 - (math.log(sigma) - math.log(sigma_min)) / (math.log(sigma_max) - math.log(sigma_min))
    return min(max(p, 0.0), 1.0)


@torch.no_grad()
def euler(denoise: Denoise, noise: Tensor, sigmas: Tensor) -> Tensor:
    """Deterministic Euler steps on the probability-flow ODE (DDIM): x <- x + (sigma' - sigma) (x - D) / sigma."""
    sigma_min, sigma_max = float(sigmas[-2]), float(sigmas[0])
    x = noise * sigmas[0]
    for sigma, sigma_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist(), strict=True):
        d = denoise(x, sigma, progress(sigma, sigma_min, sigma_max))
        x = x + (sigma_next - sigma) * (x - d) / sigma
    return x
