"""omega over the run: SPEC.md, "Omega over the run".

Progress ``p`` runs from 0 (the first, noisiest step) to 1 (the end), in ComfyUI's
percent convention (``model_sampling.percent_to_sigma``), so a schedule means the
same for every sampler and step count.
"""

from __future__ import annotations

import math
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
    def constant(cls, omega: float) -> "OmegaSchedule":
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
    """omega(p) for progress p in [0, 1]; 1.0 (no unlearning) outside [p_start, p_end]."""
    if not math.isfinite(p):
        raise GuidanceInputError(f"Sampling progress must be a finite number, got {p!r}.")
    if p < schedule.p_start or p > schedule.p_end:
        return 1.0
    if schedule.shape == OmegaShape.CONSTANT:
        return schedule.omega_start
    width = schedule.p_end - schedule.p_start
    t = (p - schedule.p_start) / width if width > 0 else 0.0
    if schedule.shape == OmegaShape.LINEAR:
        return schedule.omega_start + (schedule.omega_end - schedule.omega_start) * t
    # Cosine: leaves omega_start and arrives at omega_end with zero slope.
    return schedule.omega_end + (schedule.omega_start - schedule.omega_end) * 0.5 * (1.0 + math.cos(math.pi * t))
