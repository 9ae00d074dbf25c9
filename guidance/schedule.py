"""omega over the run: docs/design.md, "Omega over the run".

Progress ``p`` runs from 0 (the first, noisiest step) to 1 (the end), in ComfyUI's
percent convention (``model_sampling.percent_to_sigma``), so a schedule means the
same for every sampler and step count.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from .errors import GuidanceInputError


def check_unit_interval(name: str, value: float) -> float:
    """omega and sampling progress live in [0, 1]; anything else (NaN included) is an error naming ``name``."""
    if not math.isfinite(value) or not 0.0 <= value <= 1.0:
        raise GuidanceInputError(f"{name} must be between 0 and 1, got {value!r}.")
    return float(value)


class OmegaShape(str, Enum):
    """How omega moves from ``omega_start`` to ``omega_end`` inside the guidance interval."""

    CONSTANT = "constant"
    LINEAR = "linear"
    COSINE = "cosine"


@dataclass(frozen=True)
class OmegaSchedule:
    """omega(p): a shape, its end values, and the guidance interval [p_start, p_end].

    ``omega_end`` is ignored by the constant shape. Outside the interval the weak
    model is the fine-tuned model (omega = 1): plain CFG on the fine-tuned model.
    """

    shape: OmegaShape = OmegaShape.CONSTANT
    omega_start: float = 0.5
    omega_end: float = 0.5
    p_start: float = 0.0
    p_end: float = 1.0

    def __post_init__(self):
        try:
            object.__setattr__(self, "shape", OmegaShape(self.shape))
        except ValueError:
            shapes = ", ".join(s.value for s in OmegaShape)
            raise GuidanceInputError(f"Unknown omega schedule {self.shape!r}: choose one of {shapes}.") from None
        for name in ("omega_start", "omega_end", "p_start", "p_end"):
            check_unit_interval(name, getattr(self, name))
        if self.p_start > self.p_end:
            raise GuidanceInputError(
                f"The guidance interval is empty: start {self.p_start:g} is after end {self.p_end:g}."
            )

    @classmethod
    def constant(cls, omega: float) -> OmegaSchedule:
        return cls(OmegaShape.CONSTANT, omega, omega)

    @property
    def is_flat(self) -> bool:
        """True when omega is one value inside the guidance interval (it is 1 outside)."""
        return self.shape == OmegaShape.CONSTANT or self.omega_start == self.omega_end

    @property
    def is_constant(self) -> bool:
        """True when omega is one value over the whole run (no interval, no ramp)."""
        return self.is_flat and self.p_start == 0.0 and self.p_end == 1.0


def omega_at(schedule: OmegaSchedule, p: float) -> float:
    """omega(p) for progress p in [0, 1]; 1.0 (no unlearning) outside [p_start, p_end].

    Decides the interval on progress. Sampling decides it on sigma (``omega_at_sigma``),
    where a step exactly on an end of the interval is inside as ComfyUI counts it.
    """
    if not math.isfinite(p):
        raise GuidanceInputError(f"Sampling progress must be a finite number, got {p!r}.")
    if p < schedule.p_start or p > schedule.p_end:
        return 1.0
    return _inside(schedule, p)


def _inside(schedule: OmegaSchedule, p: float) -> float:
    """omega inside the guidance interval, at progress p (clamped to the interval for the ramp)."""
    if schedule.shape == OmegaShape.CONSTANT:
        return schedule.omega_start
    width = schedule.p_end - schedule.p_start
    t = min(max((p - schedule.p_start) / width, 0.0), 1.0) if width > 0 else 0.0
    if schedule.shape == OmegaShape.LINEAR:
        return schedule.omega_start + (schedule.omega_end - schedule.omega_start) * t
    # Cosine: leaves omega_start and arrives at omega_end with zero slope.
    return schedule.omega_end + (schedule.omega_start - schedule.omega_end) * 0.5 * (1.0 + math.cos(math.pi * t))


PercentToSigma = Callable[[float], float]


def progress_of_sigma(percent_to_sigma: PercentToSigma, sigma: float) -> float:
    """p in [0, 1] with ``percent_to_sigma(p) == sigma``: the inverse, by bisection.

    ``percent_to_sigma`` is the model's (ComfyUI's ``model_sampling.percent_to_sigma``),
    decreasing in p. Where it is flat in float32 the result is within the plateau, so
    whether a step is inside the guidance interval is decided on sigma, not on this.
    """
    lo, hi = 0.0, 1.0
    if sigma >= float(percent_to_sigma(1e-9)):
        return 0.0
    for _ in range(48):
        mid = 0.5 * (lo + hi)
        if float(percent_to_sigma(mid)) > sigma:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def in_interval(schedule: OmegaSchedule, sigma: float, percent_to_sigma: PercentToSigma) -> bool:
    """Whether the step with noise level ``sigma`` is inside the guidance interval, decided in sigma space as
    ComfyUI decides its timestep ranges: ``percent_to_sigma(p_end) <= sigma <= percent_to_sigma(p_start)``."""
    return float(percent_to_sigma(schedule.p_end)) <= float(sigma) <= float(percent_to_sigma(schedule.p_start))


def omega_at_sigma(schedule: OmegaSchedule, sigma: float, percent_to_sigma: PercentToSigma,
                   progress: Callable[[float], float] | None = None) -> float:
    """omega at the step with noise level ``sigma``: docs/design.md, "Omega over the run".

    The guidance interval is closed at both ends and decided in sigma space, as
    ComfyUI's own timestep ranges decide it: the step is inside when
    ``percent_to_sigma(p_end) <= sigma <= percent_to_sigma(p_start)``. Inside, a ramp
    moves with the step's progress (``progress(sigma)``, by default ``progress_of_sigma``).
    """
    sigma = float(sigma)
    if not math.isfinite(sigma):
        raise GuidanceInputError(f"A sampling step's sigma must be a finite number, got {sigma!r}.")
    if not in_interval(schedule, sigma, percent_to_sigma):
        return 1.0
    if schedule.shape == OmegaShape.CONSTANT:
        return schedule.omega_start
    p = progress(sigma) if progress is not None else progress_of_sigma(percent_to_sigma, sigma)
    return _inside(schedule, p)
