"""guidance.estimate_weights and guidance.guidance_per_step: what the schedule preview plots.

Torch-only tier: no ComfyUI import. The weights must reproduce ``combine`` exactly as
an affine combination, for every evaluation plan; the per-step table must be
omega_at and plan_evaluations step by step.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from guidance import (
    EstimateWeights,
    Evaluations,
    OmegaSchedule,
    OmegaShape,
    combine,
    estimate_weights,
    guidance_per_step,
    omega_at,
    plan_evaluations,
)
from guidance.estimates import SCALE_MAX

FAST = settings(max_examples=60, deadline=None, database=None)

scales = st.one_of(st.sampled_from([0.0, 1.0, 3.0, 7.5, SCALE_MAX]), st.floats(min_value=0.0, max_value=SCALE_MAX))
omegas = st.one_of(st.sampled_from([0.0, 1.0]), st.floats(min_value=0.0, max_value=1.0))
seeds = st.integers(min_value=0, max_value=2**31 - 1)


def weighted_sum(weights: EstimateWeights, c, n, w):
    return weights.ft_positive * c + weights.ft_negative * n + weights.weak_null * w


@FAST
@given(seed=seeds, lambda_p=scales, lambda_t=scales, omega=omegas, negative_is_null=st.booleans())
def test_weights_reproduce_combine(seed, lambda_p, lambda_t, omega, negative_is_null):
    g = torch.Generator().manual_seed(seed)
    c, n, w = (torch.randn(2, 4, 3, 3, generator=g, dtype=torch.float64) for _ in range(3))
    plan = plan_evaluations(lambda_p, lambda_t, omega, negative_is_null)
    weights = estimate_weights(plan, lambda_p, lambda_t)
    expected = combine(plan, c if plan.ft_positive else None, n if plan.ft_negative else None,
                       w if plan.weak_null else None, lambda_p, lambda_t)
    tol = 1e-12 * (1.0 + lambda_p + lambda_t)
    torch.testing.assert_close(weighted_sum(weights, c, n, w), expected, rtol=tol, atol=tol)


@FAST
@given(lambda_p=scales, lambda_t=scales, omega=omegas, negative_is_null=st.booleans())
def test_weights_sum_to_one_and_skipped_evaluations_weigh_nothing(lambda_p, lambda_t, omega, negative_is_null):
    plan = plan_evaluations(lambda_p, lambda_t, omega, negative_is_null)
    weights = estimate_weights(plan, lambda_p, lambda_t)
    assert math.isclose(weights.ft_positive + weights.ft_negative + weights.weak_null, 1.0, abs_tol=1e-12)
    for evaluated, weight in ((plan.ft_positive, weights.ft_positive), (plan.ft_negative, weights.ft_negative),
                              (plan.weak_null, weights.weak_null)):
        if not evaluated:
            assert weight == 0.0


@pytest.mark.parametrize(
    ("lambda_p", "lambda_t", "expected"),
    [
        (7.5, 7.5, EstimateWeights(7.5, 0.0, -6.5)),  # two-way: lambda on D_ft(c), 1 - lambda on D_w(null)
        (3.0, 7.5, EstimateWeights(7.5, -4.5, -2.0)),  # three-way: lt, lp - lt, 1 - lp
        (1.0, 5.0, EstimateWeights(5.0, -4.0, 0.0)),  # lambda_p = 1: CFG with the negative
        (1.0, 1.0, EstimateWeights(1.0, 0.0, 0.0)),  # the fine-tuned model alone
    ],
)
def test_weights_of_the_spec_estimates(lambda_p, lambda_t, expected):
    plan = plan_evaluations(lambda_p, lambda_t, omega=0.5, negative_is_null=False)
    assert estimate_weights(plan, lambda_p, lambda_t) == pytest.approx(expected)


def test_weights_of_a_plan_without_the_weak_term_move_onto_the_negative():
    # three-way, omega = 1, n = null: D_w(null) is D_ft(n), so its weight 1 - lambda_p joins D_ft(n)'s.
    plan = plan_evaluations(3.0, 7.5, 1.0, negative_is_null=True)
    assert plan == Evaluations(ft_positive=True, ft_negative=True, weak_null=False)
    assert estimate_weights(plan, 3.0, 7.5) == pytest.approx(EstimateWeights(7.5, -6.5, 0.0))


def test_per_step_follows_the_schedule():
    schedule = OmegaSchedule(OmegaShape.COSINE, 0.2, 1.0, 0.1, 0.8)
    progress = [0.0, 0.05, 0.1, 0.3, 0.5, 0.8, 0.9, 1.0]
    steps = guidance_per_step(schedule, progress, 3.0, 7.5, negative_is_null=True)
    assert [s.progress for s in steps] == progress
    assert [s.omega for s in steps] == [omega_at(schedule, p) for p in progress]
    for step in steps:
        assert step.evaluations == plan_evaluations(3.0, 7.5, step.omega, True)
        assert step.weights == estimate_weights(step.evaluations, 3.0, 7.5)
    # Outside [0.1, 0.8] omega is 1: with n = null the weak evaluation is skipped there.
    assert [s.evaluations.count for s in steps] == [2, 2, 3, 3, 3, 2, 2, 2]


def test_per_step_two_way_is_constant_weights_and_two_evaluations():
    steps = guidance_per_step(OmegaSchedule.constant(0.4), [0.0, 0.5, 1.0], 6.0, 6.0, negative_is_null=True)
    assert {s.omega for s in steps} == {0.4}
    assert {s.evaluations.count for s in steps} == {2}
    assert {s.weights for s in steps} == {EstimateWeights(6.0, 0.0, -5.0)}
