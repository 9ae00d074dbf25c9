"""guidance.parse_values and guidance.sweep_combinations: the PG Sweep node's value lists.

Torch-only tier: no ComfyUI import.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from guidance import GuidanceInputError, check_scale, check_unit_interval, parse_values, sweep_combinations
from guidance.sweep import MAX_IMAGES, MAX_VALUES

FAST = settings(max_examples=60, deadline=None, database=None)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0.3, 0.5, 0.7", (0.3, 0.5, 0.7)),
        ("0.3,0.5", (0.3, 0.5)),
        (" 1 ", (1.0,)),
        ("0 .25 1.", (0.0, 0.25, 1.0)),
        ("0.1; 0.2\n0.3", (0.1, 0.2, 0.3)),
        ("5e-1, +1", (0.5, 1.0)),
        ("1, 0", (1.0, 0.0)),  # the order typed is the order of the rows
    ],
)
def test_parse_values_accepts(text, expected):
    assert parse_values("omega_values", text, check_unit_interval) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "omega_values is empty"),
        (" , ;", "omega_values is empty"),
        ("0.3, abc", "omega_values: 'abc' is not a number"),
        ("nan", "'nan' is not a number"),
        ("inf", "'inf' is not a number"),
        ("0x1", "'0x1' is not a number"),
        ("1/2", "'1/2' is not a number"),
        ("1.5", "omega_values must be between 0 and 1, got 1.5"),
        ("-0.1", "omega_values must be between 0 and 1, got -0.1"),
        ("0.5, 0.50", "omega_values lists 0.5 twice"),
        (", ".join(["0.1"] * (MAX_VALUES + 1)), f"at most {MAX_VALUES} per list"),
    ],
)
def test_parse_values_refuses(text, message):
    with pytest.raises(GuidanceInputError, match=message.replace("(", r"\(")):
        parse_values("omega_values", text, check_unit_interval)


def test_parse_values_uses_the_given_range_check():
    assert parse_values("lambda_values", "1, 7.5, 100", check_scale) == (1.0, 7.5, 100.0)
    with pytest.raises(GuidanceInputError, match="lambda_values must be between 0 and 100, got 101.0"):
        parse_values("lambda_values", "7.5, 101", check_scale)
    with pytest.raises(GuidanceInputError, match="got inf"):
        parse_values("lambda_values", "1e400", check_scale)


@FAST
@given(st.lists(st.floats(min_value=0.0, max_value=1.0), min_size=1, max_size=MAX_VALUES, unique=True))
def test_parse_values_round_trips_what_it_is_given(values):
    assert parse_values("omega_values", ", ".join(repr(v) for v in values), check_unit_interval) == tuple(values)


def test_combinations_are_omega_major():
    assert sweep_combinations((0.2, 0.8), (3.0, 5.0, 7.0)) == [
        (0.2, 3.0), (0.2, 5.0), (0.2, 7.0), (0.8, 3.0), (0.8, 5.0), (0.8, 7.0),
    ]


def test_combinations_are_capped_with_the_batch():
    eight = tuple(i / 10 for i in range(8))
    assert len(sweep_combinations(eight, eight)) == MAX_IMAGES == 64
    with pytest.raises(GuidanceInputError, match=r"2 omega x 3 lambda values x latent batch 11 = 66 images; at most 64"):
        sweep_combinations((0.2, 0.8), (3.0, 5.0, 7.0), batch_size=11)
