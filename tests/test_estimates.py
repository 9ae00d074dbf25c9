"""guidance.estimates: the estimates (docs/design.md, "The estimates"), their identities, and the evaluation plan.

Torch-only tier: no ComfyUI import. References are derived independently of the code
under test, mostly by expanding each estimate into its affine form
``sum_i a_i * D_i`` with ``sum_i a_i == 1`` and evaluating that in float64.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from guidance import (
    Evaluations,
    GuidanceInputError,
    cfg,
    check_scale,
    combine,
    plan_evaluations,
    plan_for_rows,
    three_way,
    two_way,
    weak_parameter,
)
from guidance.estimates import SCALE_MAX, SCALE_MIN

FAST = settings(max_examples=50, deadline=None, database=None)

seeds = st.integers(min_value=0, max_value=2**31 - 1)
shapes = st.sampled_from([(1, 4), (2, 4, 3, 3), (3, 2, 5), (4, 1, 2, 2, 2)])
# Scales over the documented range, with the values at which terms cancel drawn often.
scales = st.one_of(
    st.sampled_from([0.0, 1.0, 7.5, SCALE_MAX]),
    st.floats(min_value=SCALE_MIN, max_value=SCALE_MAX, allow_nan=False, allow_infinity=False),
)
omegas = st.one_of(st.sampled_from([0.0, 1.0]), st.floats(min_value=0.0, max_value=1.0))


def predictions(seed: int, shape, count: int, dtype=torch.float64) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=torch.float64).to(dtype) for _ in range(count)]


def close64(actual: torch.Tensor, expected: torch.Tensor, scale: float = 1.0) -> None:
    """float64 comparison whose tolerance grows with the size of the scales involved."""
    tol = 1e-12 * (1.0 + scale)
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol)


def three_way_reference(c, n, w, lambda_p, lambda_t):
    """The three-way estimate in affine form: (1 - lp) w + (lp - lt) n + lt c."""
    return (1.0 - lambda_p) * w + (lambda_p - lambda_t) * n + lambda_t * c


def two_way_reference(c, w, lam):
    return (1.0 - lam) * w + lam * c


# ---------------------------------------------------------------------------- formulas


@FAST
@given(seed=seeds, shape=shapes, lam=scales)
def test_two_way_matches_affine_form(seed, shape, lam):
    c, w = predictions(seed, shape, 2)
    close64(two_way(c, w, lam), two_way_reference(c, w, lam), lam)


@FAST
@given(seed=seeds, shape=shapes, lambda_p=scales, lambda_t=scales)
def test_three_way_matches_affine_form(seed, shape, lambda_p, lambda_t):
    c, n, w = predictions(seed, shape, 3)
    expected = three_way_reference(c, n, w, lambda_p, lambda_t)
    close64(three_way(c, n, w, lambda_p, lambda_t), expected, lambda_p + lambda_t)


@FAST
@given(seed=seeds, shape=shapes, scale=scales)
def test_cfg_is_bit_identical_to_comfyui_cfg_function(seed, shape, scale):
    # comfy.samplers.cfg_function: uncond_pred + (cond_pred - uncond_pred) * cond_scale
    for dtype in (torch.float32, torch.float16):
        c, u = predictions(seed, shape, 2, dtype)
        assert torch.equal(cfg(c, u, scale), u + (c - u) * scale)
        # Two-way with omega = 1 is CFG on the fine-tuned model, to the bit (the two_way docstring).
        assert torch.equal(two_way(c, u, scale), u + (c - u) * scale)


# ---------------------------------------------------------------------------- identities of the estimates


@FAST
@given(seed=seeds, shape=shapes)
def test_two_way_lambda_one_is_finetuned_positive(seed, shape):
    c, w = predictions(seed, shape, 2)
    close64(two_way(c, w, 1.0), c)


class ToyPair:
    """A denoiser D(x, cond) = W [x; cond] + b with base and fine-tuned weights, and its weak model at omega
    (guidance.weak_parameter: theta_ft + (omega - 1) delta), so that the omega identities involve omega."""

    def __init__(self, seed: int, width: int = 6):
        g = torch.Generator().manual_seed(seed)
        self.pre = [torch.randn(width, 2 * width, generator=g, dtype=torch.float64),
                    torch.randn(width, generator=g, dtype=torch.float64)]
        self.ft = [p + 0.3 * torch.randn(p.shape, generator=g, dtype=torch.float64) for p in self.pre]
        self.x, self.c, self.null = (torch.randn(3, width, generator=g, dtype=torch.float64) for _ in range(3))

    def weak(self, omega: float) -> list[torch.Tensor]:
        return [weak_parameter(ft, ft - pre, omega - 1.0) for pre, ft in zip(self.pre, self.ft, strict=True)]

    def denoise(self, params, cond) -> torch.Tensor:
        return torch.nn.functional.linear(torch.cat([self.x, cond], dim=-1), *params)


@FAST
@given(seed=seeds, lam=scales)
def test_two_way_omega_one_is_cfg_with_null_negative(seed, lam):
    # omega = 1: the weak model is the fine-tuned model, so the estimate is CFG on it with the null prompt, bit for bit.
    pair = ToyPair(seed)
    d_c = pair.denoise(pair.ft, pair.c)
    estimate = two_way(d_c, pair.denoise(pair.weak(1.0), pair.null), lam)
    assert torch.equal(estimate, cfg(d_c, pair.denoise(pair.ft, pair.null), lam))


@FAST
@given(seed=seeds, lam=scales)
def test_two_way_omega_zero_is_cfg_with_base_unconditional(seed, lam):
    # omega = 0: the weak model is the base model; CFG whose uncond branch is D_pre(x, null).
    pair = ToyPair(seed)
    d_c = pair.denoise(pair.ft, pair.c)
    estimate = two_way(d_c, pair.denoise(pair.weak(0.0), pair.null), lam)
    close64(estimate, cfg(d_c, pair.denoise(pair.pre, pair.null), lam), 10 * lam)


@FAST
@given(seed=seeds, lam=scales, omega=omegas)
def test_two_way_weak_model_moves_with_omega(seed, lam, omega):
    # Between the two: the weak prediction is affine in omega (D is affine in its weights), so the estimate is too.
    pair = ToyPair(seed)
    d_c = pair.denoise(pair.ft, pair.c)
    at = {o: two_way(d_c, pair.denoise(pair.weak(o), pair.null), lam) for o in (0.0, 1.0, omega)}
    close64(at[omega], (1.0 - omega) * at[0.0] + omega * at[1.0], 10 * (1.0 + lam))


@FAST
@given(seed=seeds, shape=shapes, lam=scales)
def test_three_way_equal_scales_is_two_way(seed, shape, lam):
    c, n, w = predictions(seed, shape, 3)
    got = three_way(c, n, w, lam, lam)
    close64(got, two_way(c, w, lam), 2 * lam)
    # The middle evaluation cancels: any other D_ft(x, n) gives the same estimate.
    close64(got, three_way(c, n * -3.0 + 1.0, w, lam, lam), 8 * lam)


@FAST
@given(seed=seeds, shape=shapes, lambda_t=scales)
def test_three_way_lambda_p_one_is_cfg_with_negative(seed, shape, lambda_t):
    c, n, w = predictions(seed, shape, 3)
    got = three_way(c, n, w, 1.0, lambda_t)
    close64(got, cfg(c, n, lambda_t), lambda_t)
    # The weak evaluation cancels: any D_w(x, null) gives the same estimate.
    close64(got, three_way(c, n, w * 5.0 - 2.0, 1.0, lambda_t), 8 * lambda_t)


@FAST
@given(seed=seeds, shape=shapes, lambda_p=scales, lambda_t=scales)
def test_three_way_with_null_negative_and_omega_one_is_cfg(seed, shape, lambda_p, lambda_t):
    # n = null and omega = 1: D_w(x, null) = D_ft(x, n); the personalization term vanishes.
    c, n = predictions(seed, shape, 2)
    close64(three_way(c, n, n, lambda_p, lambda_t), cfg(c, n, lambda_t), lambda_p + lambda_t)


@FAST
@given(
    seed=seeds,
    shape=shapes,
    lambda_p=scales,
    lambda_t=scales,
    sigma=st.floats(min_value=0.01, max_value=50.0),
)
def test_estimates_commute_with_eps_to_denoised(seed, shape, lambda_p, lambda_t, sigma):
    """Affine: applying to eps then converting (x - sigma * eps) equals converting then applying."""
    x, eps_c, eps_n, eps_w = predictions(seed, shape, 4)

    def denoised(eps):
        return x - sigma * eps

    tol = lambda_p + lambda_t + sigma * (1 + lambda_p + lambda_t)
    close64(
        three_way(denoised(eps_c), denoised(eps_n), denoised(eps_w), lambda_p, lambda_t),
        denoised(three_way(eps_c, eps_n, eps_w, lambda_p, lambda_t)),
        tol,
    )
    close64(two_way(denoised(eps_c), denoised(eps_w), lambda_t), denoised(two_way(eps_c, eps_w, lambda_t)), tol)
    close64(cfg(denoised(eps_c), denoised(eps_n), lambda_t), denoised(cfg(eps_c, eps_n, lambda_t)), tol)


@FAST
@given(seed=seeds, shape=shapes, lambda_p=scales, lambda_t=scales, shift=st.floats(-10, 10))
def test_estimates_preserve_a_common_constant(seed, shape, lambda_p, lambda_t, shift):
    """Weights sum to one: identical predictions give that prediction back; a common shift passes through."""
    (d,) = predictions(seed, shape, 1)
    tol = lambda_p + lambda_t
    close64(three_way(d, d, d, lambda_p, lambda_t), d, tol)
    close64(two_way(d, d, lambda_t), d, tol)
    c, n, w = predictions(seed + 1, shape, 3)
    close64(
        three_way(c + shift, n + shift, w + shift, lambda_p, lambda_t),
        three_way(c, n, w, lambda_p, lambda_t) + shift,
        tol * (1 + abs(shift)),
    )


# ---------------------------------------------------------------------------- dtype and batch


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@FAST
@given(seed=seeds, shape=shapes, lambda_p=st.floats(0.0, 10.0), lambda_t=st.floats(0.0, 10.0))
def test_dtype_and_shape_preserved(dtype, seed, shape, lambda_p, lambda_t):
    c, n, w = predictions(seed, shape, 3, dtype)
    eps = torch.finfo(dtype).eps
    for got, ref in (
        (
            three_way(c, n, w, lambda_p, lambda_t),
            three_way_reference(c.double(), n.double(), w.double(), lambda_p, lambda_t),
        ),
        (two_way(c, w, lambda_t), two_way_reference(c.double(), w.double(), lambda_t)),
        (cfg(c, n, lambda_t), two_way_reference(c.double(), n.double(), lambda_t)),
    ):
        assert got.dtype == dtype
        assert got.shape == c.shape
        magnitude = float(torch.stack([c, n, w]).double().abs().max())
        tol = 8 * eps * (1 + lambda_p + lambda_t) * (1 + magnitude)
        torch.testing.assert_close(got.double(), ref, rtol=0, atol=tol)


@FAST
@given(seed=seeds, shape=shapes, lambda_p=scales, lambda_t=scales)
def test_batch_rows_are_independent(seed, shape, lambda_p, lambda_t):
    """The estimate of a batch is the stack of the estimates of its rows, to the bit."""
    c, n, w = predictions(seed, shape, 3, torch.float32)
    batched = three_way(c, n, w, lambda_p, lambda_t)
    rows = torch.stack([three_way(c[i], n[i], w[i], lambda_p, lambda_t) for i in range(c.shape[0])])
    assert torch.equal(batched, rows)
    batched = two_way(c, w, lambda_t)
    assert torch.equal(batched, torch.stack([two_way(c[i], w[i], lambda_t) for i in range(c.shape[0])]))


# ---------------------------------------------------------------------------- plan_evaluations


@pytest.mark.parametrize(
    "lambda_p, lambda_t, omega, negative_is_null, expected",
    [
        # two-way (lambda_p == lambda_t): D_ft(c) and D_w(null)
        (7.5, 7.5, 0.5, True, Evaluations(True, False, True)),
        (7.5, 7.5, 0.5, False, Evaluations(True, False, True)),
        (3.0, 3.0, 1.0, True, Evaluations(True, False, True)),
        # two-way with lambda == 0: D_w(null) alone
        (0.0, 0.0, 0.3, True, Evaluations(False, False, True)),
        # two-way with lambda == 1: D_ft(c) alone
        (1.0, 1.0, 0.5, True, Evaluations(True, False, False)),
        (1.0, 1.0, 0.0, False, Evaluations(True, False, False)),
        # three-way, generic
        (3.0, 7.5, 0.5, False, Evaluations(True, True, True)),
        (3.0, 7.5, 0.5, True, Evaluations(True, True, True)),
        (3.0, 7.5, 1.0, False, Evaluations(True, True, True)),
        (3.0, 7.5, 0.0, True, Evaluations(True, True, True)),
        # lambda_p == 1: CFG with negative n, weak skipped
        (1.0, 7.5, 0.5, False, Evaluations(True, True, False)),
        (1.0, 7.5, 0.0, True, Evaluations(True, True, False)),
        # omega == 1 with n = null: D_w(null) is D_ft(n), weak skipped
        (3.0, 7.5, 1.0, True, Evaluations(True, True, False)),
        # lambda_t == 0 (three-way): D_ft(c) drops out
        (3.0, 0.0, 0.5, False, Evaluations(False, True, True)),
        (1.0, 0.0, 0.5, False, Evaluations(False, True, False)),
    ],
)
def test_plan_evaluations_table(lambda_p, lambda_t, omega, negative_is_null, expected):
    plan = plan_evaluations(lambda_p, lambda_t, omega, negative_is_null)
    assert plan == expected
    assert plan.count == int(expected.ft_positive) + int(expected.ft_negative) + int(expected.weak_null)


def test_plan_evaluation_counts_of_spec():
    assert plan_evaluations(7.5, 7.5, 0.5, True).count == 2  # two-way
    assert plan_evaluations(3.0, 7.5, 0.5, False).count == 3  # three-way
    assert plan_evaluations(1.0, 1.0, 0.5, True).count == 1  # lambda = 1
    assert plan_evaluations(1.0, 7.5, 0.5, False).count == 2  # lambda_p = 1
    assert plan_evaluations(3.0, 7.5, 1.0, True).count == 2  # omega = 1, n = null
    assert plan_evaluations(3.0, 7.5, 1.0, False).count == 3  # omega = 1 but a real negative


@FAST
@given(lambda_p=scales, lambda_t=scales, omega=omegas, negative_is_null=st.booleans())
def test_plan_never_exceeds_three_and_always_evaluates_something(lambda_p, lambda_t, omega, negative_is_null):
    plan = plan_evaluations(lambda_p, lambda_t, omega, negative_is_null)
    assert 1 <= plan.count <= 3
    if math.isclose(lambda_p, lambda_t):
        assert not plan.ft_negative and plan.count <= 2
    if math.isclose(lambda_p, 1.0):
        assert not plan.weak_null


# ---------------------------------------------------------------------------- combine == three_way for every plan


@FAST
@given(
    seed=seeds,
    shape=shapes,
    lambda_p=scales,
    lambda_t=scales,
    omega=omegas,
    negative_is_null=st.booleans(),
)
def test_combine_equals_full_three_way(seed, shape, lambda_p, lambda_t, omega, negative_is_null):
    c, n, w = predictions(seed, shape, 3)
    if negative_is_null and math.isclose(omega, 1.0):
        w = n.clone()  # the weak model is the fine-tuned model and n is null: D_w(null) == D_ft(n)
    plan = plan_evaluations(lambda_p, lambda_t, omega, negative_is_null)
    got = combine(
        plan,
        c if plan.ft_positive else None,
        n if plan.ft_negative else None,
        w if plan.weak_null else None,
        lambda_p,
        lambda_t,
    )
    assert got.shape == c.shape
    close64(got, three_way_reference(c, n, w, lambda_p, lambda_t), lambda_p + lambda_t)


@FAST
@given(
    seed=seeds,
    lam=scales,
    eps=st.floats(min_value=-1e-11, max_value=1e-11).filter(lambda e: e != 0.0),
)
def test_combine_with_nearly_equal_scales_stays_within_fp_tolerance(seed, lam, eps):
    """plan_evaluations treats math.isclose scales as equal; the skipped term must stay negligible."""
    lambda_p, lambda_t = lam, lam + eps * max(lam, 1.0)
    assume(SCALE_MIN <= lambda_t <= SCALE_MAX)
    c, n, w = predictions(seed, (2, 3), 3)
    plan = plan_evaluations(lambda_p, lambda_t, 0.5, False)
    got = combine(
        plan, c if plan.ft_positive else None, n if plan.ft_negative else None, w if plan.weak_null else None,
        lambda_p, lambda_t,
    )
    torch.testing.assert_close(got, three_way_reference(c, n, w, lambda_p, lambda_t), rtol=1e-8, atol=1e-8)


# ---------------------------------------------------------------------------- check_scale


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, -1e-9, -1.0, SCALE_MAX + 1e-6, 1e6])
@pytest.mark.parametrize("name", ["lambda_p", "cfg_text"])
def test_check_scale_rejects(name, value):
    with pytest.raises(GuidanceInputError) as err:
        check_scale(name, value)
    assert name in str(err.value)
    assert isinstance(err.value, ValueError)


@FAST
@given(value=st.floats(min_value=SCALE_MIN, max_value=SCALE_MAX))
def test_check_scale_accepts_range(value):
    got = check_scale("lambda", value)
    assert got == value and type(got) is float


def test_check_scale_accepts_ints_and_bounds():
    assert check_scale("lambda", 7) == 7.0 and type(check_scale("lambda", 7)) is float
    assert check_scale("lambda", SCALE_MIN) == SCALE_MIN
    assert check_scale("lambda", SCALE_MAX) == SCALE_MAX


# ---------------------------------------------------------------------------- plan_for_rows

# Values where the plan's cancellations happen, mixed with others.
_special_scales = st.sampled_from([0.0, 1.0, 2.5, 7.0])


@FAST
@given(
    rows=st.lists(st.tuples(_special_scales, _special_scales, st.sampled_from([0.0, 0.4, 1.0])), min_size=1, max_size=5),
    negative_is_null=st.booleans(),
    same_scales=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_plan_for_rows_gives_every_row_its_own_three_way_estimate(rows, negative_is_null, same_scales, seed):
    """combine() with the rows' plan and per-row scales equals the three-way formula row by row, written out by hand
    from the definitions (D_w(null) is D_ft(n) where omega is 1 and n is null)."""
    lambdas_p = [p for p, _, _ in rows]
    lambdas_t = lambdas_p if same_scales else [t for _, t, _ in rows]  # two-way rows: lambda_p == lambda_t
    omegas = [o for _, _, o in rows]
    plan = plan_for_rows(lambdas_p, lambdas_t, omegas, negative_is_null)
    assert plan == Evaluations(*(any(getattr(plan_evaluations(p, t, o, negative_is_null), f) for p, t, o in
                                     zip(lambdas_p, lambdas_t, omegas, strict=True))
                                 for f in ("ft_positive", "ft_negative", "weak_null")))
    g = torch.Generator().manual_seed(seed)
    d_c, d_n, d_w = (torch.randn(len(rows), 3, generator=g, dtype=torch.float64) for _ in range(3))
    for i, omega in enumerate(omegas):
        if omega == 1.0 and negative_is_null:
            d_w[i] = d_n[i]
    expected = torch.stack([
        d_w[i] + lambdas_p[i] * (d_n[i] - d_w[i]) + lambdas_t[i] * (d_c[i] - d_n[i]) for i in range(len(rows))
    ])
    scale = lambda values: torch.tensor(values, dtype=torch.float64).view(-1, 1)  # noqa: E731
    got = combine(plan, d_c if plan.ft_positive else None, d_n if plan.ft_negative else None,
                  d_w if plan.weak_null else None, scale(lambdas_p), scale(lambdas_t))
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
