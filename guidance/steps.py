"""Guidance step by step: what a run does at each sampling step, for previews.

Per step: omega(p) (docs/design.md, "Omega over the run"), the evaluations the estimate
needs there, and the weights it puts on them: the same functions the sampling
runtime calls, so a preview shows what sampling will do.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .estimates import EstimateWeights, Evaluations, estimate_weights, plan_evaluations
from .schedule import OmegaSchedule, omega_at


@dataclass(frozen=True)
class StepGuidance:
    """One sampling step: its progress p, omega(p), the evaluations made and their weights in the estimate."""

    progress: float
    omega: float
    evaluations: Evaluations
    weights: EstimateWeights


def guidance_per_step(
    schedule: OmegaSchedule,
    progress: Sequence[float],
    lambda_p: float,
    lambda_t: float,
    negative_is_null: bool,
    omegas: Sequence[float] | None = None,
) -> list[StepGuidance]:
    """Each step's omega, evaluations and weights, for the steps at sampling progress ``progress``.

    Two-way is the three-way estimate with ``lambda_p == lambda_t`` (docs/design.md, "The estimates"), as in the runtime.
    ``negative_is_null``: no negative prompt, so n is the null prompt. ``omegas``: each step's
    omega as sampling decides it (``omega_at_sigma``); by default ``omega_at`` of its progress.
    """
    if omegas is None:
        omegas = [omega_at(schedule, p) for p in progress]
    steps = []
    for p, omega in zip(progress, omegas, strict=True):
        evaluations = plan_evaluations(lambda_p, lambda_t, omega, negative_is_null)
        steps.append(StepGuidance(float(p), omega, evaluations, estimate_weights(evaluations, lambda_p, lambda_t)))
    return steps
