"""guidance.schedule: OmegaSchedule validation and omega_at (docs/design.md, "Omega over the run").

Torch-only tier: no ComfyUI import.
"""

from __future__ import annotations

import math

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from guidance import GuidanceInputError, OmegaSchedule, OmegaShape, omega_at

FAST = settings(max_examples=50, deadline=None, database=None)
# Rounding slack for "within [min, max]" and "monotone": a few ulps of numbers in [0, 1].
ULP = 4 * 2.0**-52

unit = st.one_of(st.sampled_from([0.0, 1.0, 0.5]), st.floats(min_value=0.0, max_value=1.0))
ramps = st.sampled_from([OmegaShape.LINEAR, OmegaShape.COSINE])
shapes = st.sampled_from(list(OmegaShape))


@st.composite
def intervals(draw, min_width: float = 0.0):
    a, b = draw(unit), draw(unit)
    lo, hi = min(a, b), max(a, b)
    assume(hi - lo >= min_width)
    return lo, hi


@st.composite
def schedules(draw, shape=shapes, min_width: float = 0.0):
    p_start, p_end = draw(intervals(min_width))
    return OmegaSchedule(draw(shape), draw(unit), draw(unit), p_start, p_end)


def reference_omega(s: OmegaSchedule, p: float) -> float:
    """omega(p) written from docs/design.md ("Omega over the run"), independently: interpolate with weight t = progress in the interval."""
    if not s.p_start <= p <= s.p_end:
        return 1.0
    if s.shape == OmegaShape.CONSTANT:
        return s.omega_start
    t = 0.0 if s.p_end == s.p_start else (p - s.p_start) / (s.p_end - s.p_start)
    if s.shape == OmegaShape.COSINE:
        t = (1.0 - math.cos(math.pi * t)) / 2.0  # eased weight: 0 -> 1 with zero slope at both ends
    return (1.0 - t) * s.omega_start + t * s.omega_end


# ---------------------------------------------------------------------------- validation


@pytest.mark.parametrize("field", ["omega_start", "omega_end", "p_start", "p_end"])
@pytest.mark.parametrize("value", [-0.01, 1.01, -1.0, 2.0, math.nan, math.inf, -math.inf])
def test_out_of_range_values_raise_naming_the_field(field, value):
    kwargs = dict(shape=OmegaShape.LINEAR, omega_start=0.2, omega_end=0.8, p_start=0.0, p_end=1.0)
    kwargs[field] = value
    with pytest.raises(GuidanceInputError) as err:
        OmegaSchedule(**kwargs)
    message = str(err.value)
    assert field in message
    assert "0" in message and "1" in message  # states the allowed range


@FAST
@given(p_start=unit, p_end=unit)
def test_start_after_end_raises(p_start, p_end):
    assume(p_start > p_end)
    with pytest.raises(GuidanceInputError) as err:
        OmegaSchedule(OmegaShape.CONSTANT, 0.5, 0.5, p_start, p_end)
    assert "start" in str(err.value) and "end" in str(err.value)


def test_guidance_input_error_is_a_value_error():
    with pytest.raises(ValueError):
        OmegaSchedule(OmegaShape.CONSTANT, 1.5, 0.5)


def test_unknown_shape_is_rejected():
    with pytest.raises(GuidanceInputError, match="Unknown omega schedule 'sawtooth'.*constant, linear, cosine"):
        OmegaSchedule("sawtooth", 0.5, 0.5)


@pytest.mark.parametrize("p", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_progress_is_rejected(p):
    with pytest.raises(GuidanceInputError, match="progress must be a finite number"):
        omega_at(OmegaSchedule("linear", 0.2, 0.8), p)


@pytest.mark.parametrize("name", ["constant", "linear", "cosine"])
def test_shape_given_as_string_is_normalized(name):
    s = OmegaSchedule(name, 0.3, 0.6)
    assert s.shape is OmegaShape(name)
    assert omega_at(s, 0.0) == pytest.approx(0.3)


@FAST
@given(s=schedules())
def test_valid_schedules_construct_and_are_frozen(s):
    assert 0.0 <= s.p_start <= s.p_end <= 1.0
    with pytest.raises(AttributeError):
        s.omega_start = 0.1  # frozen: nodes cannot mutate a schedule shared between steps


# ---------------------------------------------------------------------------- omega_at


@FAST
@given(omega=unit, p=unit)
def test_constant_full_run(omega, p):
    s = OmegaSchedule.constant(omega)
    assert s.shape == OmegaShape.CONSTANT and (s.p_start, s.p_end) == (0.0, 1.0)
    assert omega_at(s, p) == omega


@FAST
@given(omega_start=unit, omega_end=unit, interval=intervals(), p=unit)
def test_constant_ignores_omega_end(omega_start, omega_end, interval, p):
    s = OmegaSchedule(OmegaShape.CONSTANT, omega_start, omega_end, *interval)
    expected = omega_start if interval[0] <= p <= interval[1] else 1.0
    assert omega_at(s, p) == expected


@FAST
@given(s=schedules(ramps))
def test_ramps_hit_their_end_values(s):
    assert omega_at(s, s.p_start) == pytest.approx(s.omega_start, abs=ULP)
    if s.p_end > s.p_start:
        assert omega_at(s, s.p_end) == pytest.approx(s.omega_end, abs=ULP)


@FAST
@given(s=schedules(ramps), ps=st.lists(unit, min_size=2, max_size=12))
def test_ramps_are_monotone_and_bounded_inside_the_interval(s, ps):
    lo, hi = min(s.omega_start, s.omega_end), max(s.omega_start, s.omega_end)
    inside = sorted(s.p_start + (s.p_end - s.p_start) * q for q in ps)
    inside = [min(max(p, s.p_start), s.p_end) for p in inside]
    values = [omega_at(s, p) for p in inside]
    for v in values:
        assert lo - ULP <= v <= hi + ULP
    direction = 1.0 if s.omega_end >= s.omega_start else -1.0
    for a, b in zip(values, values[1:], strict=False):
        assert direction * (b - a) >= -ULP


@FAST
@given(s=schedules(shapes), p=unit)
def test_omega_matches_independent_reference(s, p):
    assert omega_at(s, p) == pytest.approx(reference_omega(s, p), abs=1e-12)


@FAST
@given(s=schedules(ramps, min_width=0.05))
def test_linear_midpoint_and_cosine_flat_ends(s):
    mid = (s.p_start + s.p_end) / 2
    halfway = (s.omega_start + s.omega_end) / 2
    # Both ramps pass through the mean of their end values halfway (cosine by symmetry).
    assert omega_at(s, mid) == pytest.approx(halfway, abs=1e-9)
    if s.shape == OmegaShape.COSINE:
        # Zero slope at the ends: a step of h away from an end moves omega by O(h^2), not O(h).
        h = 1e-4 * (s.p_end - s.p_start)
        span = abs(s.omega_end - s.omega_start)
        assert abs(omega_at(s, s.p_start + h) - s.omega_start) <= 1e-6 * span + 1e-12
        assert abs(omega_at(s, s.p_end - h) - s.omega_end) <= 1e-6 * span + 1e-12
    else:
        quarter = s.p_start + (s.p_end - s.p_start) / 4
        assert omega_at(s, quarter) == pytest.approx(0.75 * s.omega_start + 0.25 * s.omega_end, abs=1e-9)


@FAST
@given(s=schedules(shapes), p=st.floats(min_value=-1.0, max_value=2.0))
def test_outside_the_interval_is_one(s, p):
    assume(p < s.p_start or p > s.p_end)
    assert omega_at(s, p) == 1.0


@pytest.mark.parametrize("shape", list(OmegaShape))
def test_interval_edges_are_inside(shape):
    s = OmegaSchedule(shape, 0.2, 0.6, 0.25, 0.75)
    assert omega_at(s, 0.25) == pytest.approx(0.2)
    assert omega_at(s, 0.75) == pytest.approx(0.2 if shape == OmegaShape.CONSTANT else 0.6)
    assert omega_at(s, math.nextafter(0.25, -1.0)) == 1.0
    assert omega_at(s, math.nextafter(0.75, 2.0)) == 1.0


@FAST
@given(shape=shapes, omega_start=unit, omega_end=unit, at=unit, p=unit)
def test_zero_width_interval(shape, omega_start, omega_end, at, p):
    s = OmegaSchedule(shape, omega_start, omega_end, at, at)
    got = omega_at(s, p)
    assert math.isfinite(got)  # no 0/0 in the ramp
    if p == at:
        assert got == pytest.approx(omega_start, abs=ULP)
    else:
        assert got == 1.0


# ---------------------------------------------------------------------------- is_constant


@FAST
@given(omega=unit)
def test_is_constant_for_constant_schedules(omega):
    assert OmegaSchedule.constant(omega).is_constant
    assert OmegaSchedule(OmegaShape.LINEAR, omega, omega).is_constant
    assert OmegaSchedule(OmegaShape.COSINE, omega, omega).is_constant
    assert OmegaSchedule(OmegaShape.CONSTANT, omega, 1.0 - omega).is_constant  # omega_end ignored


@FAST
@given(s=schedules(shapes))
def test_is_constant_agrees_with_sampled_omega(s):
    """is_constant promises one omega over the whole run; check it against omega_at on a grid."""
    values = {omega_at(s, i / 64) for i in range(65)} | {omega_at(s, s.p_start), omega_at(s, s.p_end)}
    if s.is_constant:
        assert len(values) == 1
    full_run = (s.p_start, s.p_end) == (0.0, 1.0)
    flat = s.shape == OmegaShape.CONSTANT or s.omega_start == s.omega_end
    assert s.is_constant == (full_run and flat)


@FAST
@given(s=schedules(shapes))
def test_is_flat_means_one_omega_inside_the_interval(s):
    """is_flat promises one omega other than 1 at most, over the whole run (the weak weights then never move)."""
    grid = [s.p_start + (s.p_end - s.p_start) * i / 64 for i in range(65)] + [i / 64 for i in range(65)]
    weak_values = {omega_at(s, p) for p in grid} - {1.0}
    if s.is_flat:
        assert len(weak_values) <= 1
    elif s.p_end - s.p_start > 1e-6 and abs(s.omega_end - s.omega_start) > 1e-6:
        # A ramp of some height over an interval of some width (a ramp of 5e-324 rounds to one value).
        assert len(weak_values) > 1


@pytest.mark.parametrize(
    "schedule",
    [
        OmegaSchedule(OmegaShape.LINEAR, 0.2, 0.8),
        OmegaSchedule(OmegaShape.COSINE, 0.8, 0.2),
        OmegaSchedule(OmegaShape.CONSTANT, 0.5, 0.5, 0.0, 0.9),
        OmegaSchedule(OmegaShape.CONSTANT, 0.5, 0.5, 0.1, 1.0),
    ],
)
def test_not_constant(schedule):
    assert not schedule.is_constant
    assert len({omega_at(schedule, i / 64) for i in range(65)}) > 1


# ---------------------------------------------------------------------------- omega_at_sigma: the interval on sigma


def _discrete_percent_to_sigma():
    """ComfyUI's ModelSamplingDiscrete.percent_to_sigma for SD1.5's schedule, written out: float32 sigmas of a
    scaled-linear beta schedule, interpolated in log sigma at the fractional timestep (1 - p) * 999."""
    import torch

    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    alphas = torch.cumprod(1.0 - betas, 0)
    log_sigmas = (((1 - alphas) / alphas) ** 0.5).log().float()

    def percent_to_sigma(p):
        if p <= 0.0:
            return 999999999.9
        if p >= 1.0:
            return 0.0
        t = torch.tensor((1.0 - p) * 999.0)
        low, high = t.floor().long(), t.ceil().long().clamp(max=999)
        w = t.frac()
        return float(((1 - w) * log_sigmas[low] + w * log_sigmas[high]).exp())

    return percent_to_sigma


def test_a_step_exactly_on_either_end_of_the_interval_is_inside():
    """ComfyUI's timestep ranges count sigma == percent_to_sigma(start) and == percent_to_sigma(end) as inside;
    the progress of such a sigma, inverted in float32, can land just below the start (0.4999999847 for 0.5)."""
    from guidance import omega_at_sigma, progress_of_sigma

    to_sigma = _discrete_percent_to_sigma()
    schedule = OmegaSchedule(OmegaShape.LINEAR, 0.2, 0.6, 0.5, 0.8)
    start, end = to_sigma(0.5), to_sigma(0.8)
    assert omega_at_sigma(schedule, start, to_sigma) == pytest.approx(0.2, abs=1e-6)
    assert omega_at_sigma(schedule, end, to_sigma) == pytest.approx(0.6, abs=1e-6)
    # Just outside either end, in float32 sigma steps: plain CFG.
    import numpy as np

    assert omega_at_sigma(schedule, float(np.nextafter(np.float32(start), np.float32(1e9))), to_sigma) == 1.0
    assert omega_at_sigma(schedule, float(np.nextafter(np.float32(end), np.float32(0))), to_sigma) == 1.0
    # Deciding on progress instead would get the start wrong wherever the plateau puts it below 0.5.
    p = progress_of_sigma(to_sigma, start)
    assert to_sigma(p) == start and abs(p - 0.5) < 1e-6


@FAST
@given(schedule=schedules(), p=unit)
def test_omega_at_sigma_agrees_with_omega_at_away_from_the_ends(schedule, p):
    """Inside the interval, and outside it, the sigma decision is the progress decision, for a strictly
    decreasing percent_to_sigma without float32 plateaus."""
    from guidance import omega_at_sigma

    def to_sigma(q):
        return 10.0 * (1.0 - q) + 1e-3

    assume(abs(p - schedule.p_start) > 1e-9 and abs(p - schedule.p_end) > 1e-9)
    got = omega_at_sigma(schedule, to_sigma(p), to_sigma)
    assert got == pytest.approx(omega_at(schedule, p), abs=1e-6)
