"""The guidance estimates (docs/design.md, "The estimates"), as tensor functions.

Every estimate is an affine combination of model predictions (its weights sum to
one), so it holds for eps, v or denoised predictions alike. ComfyUI hands us
denoised predictions, so the names below say ``d_``.

Symbols follow docs/design.md: ``d_ft_c`` is D_ft(x, c), ``d_ft_n`` is D_ft(x, n),
``d_w_null`` is D_w(x, null); ``lambda_p`` and ``lambda_t`` are the
personalization and text scales.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor

from .errors import GuidanceInputError

SCALE_MIN = 0.0
SCALE_MAX = 100.0


def two_way(d_ft_c: Tensor, d_w_null: Tensor, lam: float) -> Tensor:
    """D = D_w(x, null) + lambda * (D_ft(x, c) - D_w(x, null))  (the paper's estimate).

    Written in the order ComfyUI's ``cfg_function`` uses, so that the two agree bit for bit.
    """
    return d_w_null + (d_ft_c - d_w_null) * lam


def three_way(d_ft_c: Tensor, d_ft_n: Tensor, d_w_null: Tensor, lambda_p: float, lambda_t: float) -> Tensor:
    """D = D_w(null) + lambda_p (D_ft(n) - D_w(null)) + lambda_t (D_ft(c) - D_ft(n))  (this pack's extension)."""
    return d_w_null + (d_ft_n - d_w_null) * lambda_p + (d_ft_c - d_ft_n) * lambda_t


def cfg(d_c: Tensor, d_n: Tensor, scale: float) -> Tensor:
    """Plain classifier-free guidance: D = D(n) + scale * (D(c) - D(n))."""
    return d_n + (d_c - d_n) * scale


@dataclass(frozen=True)
class Evaluations:
    """Which of the three model evaluations a step needs.

    ``ft_positive``: D_ft(x, c). ``ft_negative``: D_ft(x, n). ``weak_null``: D_w(x, null).
    """

    ft_positive: bool
    ft_negative: bool
    weak_null: bool

    @property
    def count(self) -> int:
        return int(self.ft_positive) + int(self.ft_negative) + int(self.weak_null)


def plan_evaluations(lambda_p: float, lambda_t: float, omega: float, negative_is_null: bool) -> Evaluations:
    """The evaluations the three-way estimate needs once its cancellations are used (docs/design.md, "The estimates").

    - ``lambda_p == lambda_t``: the D_ft(n) terms cancel, leaving the two-way estimate.
    - ``lambda_p == 1``: the D_w(null) terms cancel, leaving CFG with negative n.
    - ``omega == 1`` with ``n = null``: D_w(null) is D_ft(n), so one of the two suffices.
    - ``lambda_t == 0``: D_ft(c) drops out (two-way: D_w(null) alone).
    """
    two_way_form = math.isclose(lambda_p, lambda_t)
    skip_weak = math.isclose(lambda_p, 1.0)
    if two_way_form:
        # Two-way: lambda == 1 is D_ft(c) alone, lambda == 0 is D_w(null) alone.
        return Evaluations(ft_positive=not math.isclose(lambda_t, 0.0), ft_negative=False, weak_null=not skip_weak)
    if not skip_weak and math.isclose(omega, 1.0) and negative_is_null:
        skip_weak = True
    return Evaluations(
        ft_positive=not math.isclose(lambda_t, 0.0),
        ft_negative=True,
        weak_null=not skip_weak,
    )


def plan_for_rows(
    lambdas_p: Sequence[float], lambdas_t: Sequence[float], omegas: Sequence[float], negative_is_null: bool
) -> Evaluations:
    """The evaluations for rows that each have their own scales and omega but share one batch (PG Sweep).

    What any row needs: an evaluation is left out only where its terms cancel for
    every row, so ``combine`` with this plan and per-row scales (tensors) gives every
    row its own estimate.
    """
    plans = [plan_evaluations(p, t, o, negative_is_null) for p, t, o in zip(lambdas_p, lambdas_t, omegas, strict=True)]
    return Evaluations(
        ft_positive=any(plan.ft_positive for plan in plans),
        ft_negative=any(plan.ft_negative for plan in plans),
        weak_null=any(plan.weak_null for plan in plans),
    )


def combine(
    evaluations: Evaluations,
    d_ft_c: Tensor | None,
    d_ft_n: Tensor | None,
    d_w_null: Tensor | None,
    lambda_p: float,
    lambda_t: float,
) -> Tensor:
    """The estimate for the evaluations that ``plan_evaluations`` asked for.

    Terms that were skipped are passed as ``None``; the result is the same three-way
    estimate with the cancelled terms removed.
    """
    if not evaluations.ft_negative:
        if not evaluations.weak_null:
            return d_ft_c  # two-way with lambda == 1
        if not evaluations.ft_positive:
            return d_w_null  # two-way with lambda == 0
        return two_way(d_ft_c, d_w_null, lambda_t)
    if not evaluations.weak_null:
        # lambda_p == 1, or D_w(null) == D_ft(n): the personalization term vanishes, leaving CFG with negative n.
        return cfg(d_ft_c, d_ft_n, lambda_t) if evaluations.ft_positive else d_ft_n
    if not evaluations.ft_positive:
        return d_w_null + (d_ft_n - d_w_null) * lambda_p
    return three_way(d_ft_c, d_ft_n, d_w_null, lambda_p, lambda_t)


def check_scale(name: str, value: float) -> float:
    """A guidance scale must be finite and within [SCALE_MIN, SCALE_MAX]."""
    if not math.isfinite(value) or not SCALE_MIN <= value <= SCALE_MAX:
        raise GuidanceInputError(f"{name} must be between {SCALE_MIN:g} and {SCALE_MAX:g}, got {value!r}.")
    return float(value)


@dataclass(frozen=True)
class EstimateWeights:
    """The weights an estimate puts on each evaluation: D = sum of weight * prediction. They sum to one.

    ``ft_positive`` multiplies D_ft(x, c), ``ft_negative`` D_ft(x, n), ``weak_null`` D_w(x, null);
    an evaluation that was skipped has weight zero.
    """

    ft_positive: float
    ft_negative: float
    weak_null: float


def estimate_weights(evaluations: Evaluations, lambda_p: float, lambda_t: float) -> EstimateWeights:
    """The weights ``combine`` applies for these evaluations, branch by branch (the affine form of each estimate).

    Three-way: (1 - lambda_p) D_w(null) + (lambda_p - lambda_t) D_ft(n) + lambda_t D_ft(c); the cancelled forms
    of ``plan_evaluations`` move a skipped term's weight onto the evaluation that equals it.
    """
    if not evaluations.ft_negative:
        if not evaluations.weak_null:
            return EstimateWeights(1.0, 0.0, 0.0)
        if not evaluations.ft_positive:
            return EstimateWeights(0.0, 0.0, 1.0)
        return EstimateWeights(lambda_t, 0.0, 1.0 - lambda_t)
    if not evaluations.weak_null:
        return EstimateWeights(lambda_t, 1.0 - lambda_t, 0.0) if evaluations.ft_positive else EstimateWeights(0.0, 1.0, 0.0)
    if not evaluations.ft_positive:
        return EstimateWeights(0.0, lambda_p, 1.0 - lambda_p)
    return EstimateWeights(lambda_t, lambda_p - lambda_t, 1.0 - lambda_p)
