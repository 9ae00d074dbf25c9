"""Named guidance settings (presets) and their JSON file format: parsed and validated, never evaluated.

A preset file is one JSON object with exactly these keys::

    {"version": 1, "name": "sd15_lora", "description": "...",
     "schedule": "constant", "omega": 0.5, "omega_end": 0.5, "guidance_start": 0.0, "guidance_end": 1.0,
     "estimate": "two-way", "guidance_scale": 7.5, "personalization_scale": 7.5}

The schedule fields are the Weak Model Interpolator's (docs/design.md, "Omega over the
run"); ``estimate`` is "two-way" (the paper) or "three-way"; the scales are the
guider's. The file is read with ``json.loads`` alone; every value is checked for
type and range, unknown or missing keys are refused, and so are duplicate keys,
NaN and infinities.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from enum import Enum
from typing import Any

from .errors import GuidanceInputError
from .estimates import check_scale
from .schedule import OmegaSchedule, OmegaShape, check_unit_interval

PRESET_VERSION = 1
MAX_PRESET_BYTES = 16 * 1024
MAX_DESCRIPTION = 1000
# A name is also the file's stem: letters, digits, spaces, '-' and '_', starting with a letter or digit.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9 _-]{0,63}")
_RESERVED = frozenset({"CON", "PRN", "AUX", "NUL"} | {f"{p}{i}" for p in ("COM", "LPT") for i in range(1, 10)})


class PresetEstimate(str, Enum):
    """The estimate, as a preset file names it (stable, independent of the node's labels)."""

    TWO_WAY = "two-way"
    THREE_WAY = "three-way"


# The keys of a preset file, in the order it is written.
KEYS = ("version", "name", "description", "schedule", "omega", "omega_end", "guidance_start", "guidance_end",
        "estimate", "guidance_scale", "personalization_scale")
_STRINGS = ("name", "description", "schedule", "estimate")
_NUMBERS = ("omega", "omega_end", "guidance_start", "guidance_end", "guidance_scale", "personalization_scale")


def check_preset_name(name: str) -> str:
    """A preset's name, safe as a file name on every system: no path separators, dots or reserved names."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or name != name.strip():
        raise GuidanceInputError(
            f"Preset name {name!r} is not allowed: use 1 to 64 letters, digits, spaces, '-' or '_', "
            "starting with a letter or digit (it becomes the file name)."
        )
    if name.upper() in _RESERVED:
        raise GuidanceInputError(f"Preset name {name!r} is reserved by Windows for a device: choose another.")
    return name


@dataclass(frozen=True)
class Preset:
    """Validated preset settings; building one checks every range (as the nodes that use them do)."""

    name: str
    description: str
    schedule: OmegaShape
    omega: float
    omega_end: float
    guidance_start: float
    guidance_end: float
    estimate: PresetEstimate
    guidance_scale: float
    personalization_scale: float

    def __post_init__(self):
        check_preset_name(self.name)
        if len(self.description) > MAX_DESCRIPTION:
            raise GuidanceInputError(f"The description is longer than {MAX_DESCRIPTION} characters.")
        object.__setattr__(self, "schedule", _member(OmegaShape, "schedule", self.schedule))
        object.__setattr__(self, "estimate", _member(PresetEstimate, "estimate", self.estimate))
        for key in ("omega", "omega_end", "guidance_start", "guidance_end"):
            check_unit_interval(key, getattr(self, key))  # named as in the file and on the widgets
        self.omega_schedule()  # the interval
        check_scale("guidance_scale", self.guidance_scale)
        check_scale("personalization_scale", self.personalization_scale)

    def omega_schedule(self) -> OmegaSchedule:
        """omega over the run, as the Weak Model Interpolator builds it: a constant schedule ignores omega_end."""
        end = self.omega if self.schedule == OmegaShape.CONSTANT else self.omega_end
        return OmegaSchedule(self.schedule, self.omega, end, self.guidance_start, self.guidance_end)

    def to_dict(self) -> dict[str, Any]:
        values = {key: getattr(self, key) for key in KEYS if key != "version"}
        values["schedule"] = self.schedule.value
        values["estimate"] = self.estimate.value
        return {"version": PRESET_VERSION, **values}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"


def _member(enum: type[Enum], key: str, value: Any):
    try:
        return enum(value)
    except ValueError:
        allowed = ", ".join(member.value for member in enum)
        raise GuidanceInputError(f"Unknown {key} {value!r}: choose one of {allowed}.") from None


def preset_from_dict(data: Any, source: str = "preset") -> Preset:
    """A Preset from a parsed JSON object, checking keys and types; errors name ``source`` (e.g. the file)."""
    if not isinstance(data, dict):
        raise GuidanceInputError(f"{source}: a preset is a JSON object {{...}}, got {type(data).__name__}.")
    unknown = sorted(set(data) - set(KEYS))
    missing = [key for key in KEYS if key not in data]
    if unknown:
        raise GuidanceInputError(f"{source}: unknown key(s) {unknown}; a preset has exactly {list(KEYS)}.")
    if missing:
        raise GuidanceInputError(f"{source}: missing key(s) {missing}.")
    if type(data["version"]) is not int or data["version"] != PRESET_VERSION:
        raise GuidanceInputError(f"{source}: version must be {PRESET_VERSION}, got {data['version']!r}.")
    for key in _STRINGS:
        if not isinstance(data[key], str):
            raise GuidanceInputError(f"{source}: {key} must be a string, got {data[key]!r}.")
    for key in _NUMBERS:
        value = data[key]
        if type(value) not in (int, float) or not math.isfinite(value):
            raise GuidanceInputError(f"{source}: {key} must be a finite number, got {value!r}.")
    try:
        return Preset(**{key: (float(data[key]) if key in _NUMBERS else data[key]) for key in KEYS if key != "version"})
    except GuidanceInputError as error:
        raise GuidanceInputError(f"{source}: {error}") from None


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [key for key, _ in pairs]
    duplicates = sorted({key for key in keys if keys.count(key) > 1})
    if duplicates:
        raise GuidanceInputError(f"duplicate key(s) {duplicates}")
    return dict(pairs)


def _no_constant(token: str):
    raise GuidanceInputError(f"{token} is not a number a preset may hold")


def parse_preset(text: str | bytes, source: str = "preset") -> Preset:
    """Parse and validate a preset file's contents (JSON only: nothing in it is ever evaluated)."""
    if len(text) > MAX_PRESET_BYTES:
        raise GuidanceInputError(f"{source}: {len(text)} bytes; a preset file is at most {MAX_PRESET_BYTES}.")
    try:
        data = json.loads(text, object_pairs_hook=_no_duplicate_keys, parse_constant=_no_constant)
    except GuidanceInputError as error:
        raise GuidanceInputError(f"{source}: {error}.") from None
    except ValueError as error:  # JSONDecodeError and UnicodeDecodeError
        raise GuidanceInputError(f"{source}: not valid JSON ({error}).") from None
    except RecursionError:
        raise GuidanceInputError(f"{source}: not a preset (JSON nested too deeply).") from None
    return preset_from_dict(data, source)
