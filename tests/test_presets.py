"""guidance.presets: the preset file format, and the presets shipped in presets/.

Torch-only tier: no ComfyUI import. Preset files are data: parsed with json.loads and
validated key by key; nothing else in them is ever interpreted.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from guidance import (
    GuidanceInputError,
    OmegaSchedule,
    OmegaShape,
    Preset,
    PresetEstimate,
    check_preset_name,
    parse_preset,
)
from guidance.presets import KEYS, MAX_PRESET_BYTES

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "presets").glob("*.json"))
FAST = settings(max_examples=60, deadline=None, database=None)

GOOD = {
    "version": 1,
    "name": "my preset",
    "description": "for tests",
    "schedule": "linear",
    "omega": 0.2,
    "omega_end": 0.9,
    "guidance_start": 0.0,
    "guidance_end": 0.8,
    "estimate": "three-way",
    "guidance_scale": 7.5,
    "personalization_scale": 3,
}


def text(**changes) -> str:
    data = {**GOOD, **changes}
    return json.dumps({k: v for k, v in data.items() if v is not ...})


def test_a_good_preset_parses_to_its_values():
    preset = parse_preset(text())
    assert preset == Preset("my preset", "for tests", OmegaShape.LINEAR, 0.2, 0.9, 0.0, 0.8,
                            PresetEstimate.THREE_WAY, 7.5, 3.0)
    assert preset.omega_schedule() == OmegaSchedule(OmegaShape.LINEAR, 0.2, 0.9, 0.0, 0.8)
    assert isinstance(preset.personalization_scale, float)


def test_constant_schedule_ignores_omega_end_like_the_interpolator():
    preset = parse_preset(text(schedule="constant", omega=0.4, omega_end=0.9))
    assert preset.omega_schedule() == OmegaSchedule(OmegaShape.CONSTANT, 0.4, 0.4, 0.0, 0.8)


def test_round_trip_through_json():
    preset = parse_preset(text())
    again = parse_preset(preset.to_json())
    assert again == preset
    assert list(json.loads(preset.to_json())) == list(KEYS)


@FAST
@given(
    schedule=st.sampled_from(list(OmegaShape)),
    omega=st.floats(0.0, 1.0),
    omega_end=st.floats(0.0, 1.0),
    interval=st.tuples(st.floats(0.0, 1.0), st.floats(0.0, 1.0)).map(sorted),
    estimate=st.sampled_from(list(PresetEstimate)),
    scales=st.tuples(st.floats(0.0, 100.0), st.floats(0.0, 100.0)),
)
def test_any_valid_preset_round_trips(schedule, omega, omega_end, interval, estimate, scales):
    preset = Preset("p", "", schedule, omega, omega_end, interval[0], interval[1], estimate, *scales)
    assert parse_preset(preset.to_json()) == preset


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"omega": 1.5}, "omega must be between 0 and 1, got 1.5"),
        ({"omega_end": -0.1}, "omega_end must be between 0 and 1"),
        ({"guidance_start": 0.9, "guidance_end": 0.1}, "The guidance interval is empty"),
        ({"guidance_scale": 101}, "guidance_scale must be between 0 and 100"),
        ({"personalization_scale": -1}, "personalization_scale must be between 0 and 100"),
        ({"schedule": "exponential"}, "Unknown schedule 'exponential': choose one of constant, linear, cosine"),
        ({"estimate": "two-way (paper)"}, "Unknown estimate 'two-way (paper)': choose one of two-way, three-way"),
        ({"omega": "0.5"}, "omega must be a finite number, got '0.5'"),
        ({"omega": True}, "omega must be a finite number, got True"),
        ({"omega": None}, "omega must be a finite number, got None"),
        ({"omega": [0.5]}, "omega must be a finite number"),
        ({"name": 3}, "name must be a string"),
        ({"description": "x" * 1001}, "longer than 1000 characters"),
        ({"version": 2}, "version must be 1, got 2"),
        ({"version": 1.0}, "version must be 1, got 1.0"),
        ({"version": ...}, "missing key(s) ['version']"),
        ({"omega_end": ...}, "missing key(s) ['omega_end']"),
        ({"__import__": "os"}, "unknown key(s) ['__import__']"),
        ({"name": "../../etc/passwd"}, "Preset name '../../etc/passwd' is not allowed"),
    ],
)
def test_bad_values_are_refused_with_the_reason(changes, message):
    with pytest.raises(GuidanceInputError) as error:
        parse_preset(text(**changes), source="bad.json")
    assert str(error.value).startswith("bad.json: ")
    assert message in str(error.value)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("[1, 2]", "a preset is a JSON object {...}, got list"),
        ("{\"omega\": 0.5", "not valid JSON"),
        ("omega = 0.5", "not valid JSON"),
        ("__import__('os').system('true')", "not valid JSON"),
        (text().replace("0.2", "1e400"), "omega must be a finite number, got inf"),
        (text().replace("0.2", "NaN"), "NaN is not a number a preset may hold"),
        (text().replace("0.2", "-Infinity"), "-Infinity is not a number a preset may hold"),
        (text()[:-1] + ", \"omega\": 0.3}", "duplicate key(s) ['omega']"),
        ("[" * 20000 + "]" * 20000, f"a preset file is at most {MAX_PRESET_BYTES}"),
        ("[" * 5000 + "]" * 5000, "nested too deeply"),
        (b"\xff\xfe{}", "not valid JSON"),
    ],
)
def test_bad_files_are_refused(raw, message):
    with pytest.raises(GuidanceInputError, match=None) as error:
        parse_preset(raw, source="bad.json")
    assert message in str(error.value), str(error.value)


@pytest.mark.parametrize("name", ["sd15_lora", "My Preset 2", "a", "x" * 64, "dog-v1_strong"])
def test_names_that_are_safe_file_names(name):
    assert check_preset_name(name) == name


@pytest.mark.parametrize(
    "name",
    ["", " lead", "trail ", "../up", "a/b", "a\\b", "a.b", ".hidden", "x" * 65, "CON", "nul", "lpt1", "tab\there",
     "new\nline", "ü", "*"],
)
def test_names_that_are_refused(name):
    with pytest.raises(GuidanceInputError, match="Preset name|reserved"):
        check_preset_name(name)


def test_there_are_shipped_presets_for_sd15_and_sdxl_loras():
    assert {p.stem for p in SHIPPED} >= {"sd15_lora", "sdxl_lora"}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_preset_is_valid_and_named_after_its_file(path):
    preset = parse_preset(path.read_bytes(), source=path.name)
    assert preset.name == path.stem
    assert preset.description
    assert path.read_text() == preset.to_json(), "shipped presets are written as Preset.to_json writes them"
