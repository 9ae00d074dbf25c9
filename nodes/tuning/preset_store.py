"""Preset files: the pack's shipped starting points, and the user's own presets in ComfyUI's user folder.

Shipped presets live in the pack's ``presets/`` folder and are never written. The
user's are ``<ComfyUI user directory>/personalization_guidance/presets/<name>.json``.
A name is a file stem that ``guidance.check_preset_name`` allows; files are parsed
and validated by ``guidance.parse_preset`` (JSON only, nothing evaluated).
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from pathlib import Path

import folder_paths

from ...guidance import GuidanceInputError, Preset, PresetEstimate, check_preset_name, parse_preset
from ...guidance.presets import MAX_PRESET_BYTES
from ..core.vocabulary import Estimate

log = logging.getLogger(__name__)

SHIPPED_DIR = Path(__file__).resolve().parents[2] / "presets"
USER_SUBDIR = ("personalization_guidance", "presets")

# The node's estimate labels and the preset file's names for them.
ESTIMATE_OF_PRESET = {PresetEstimate.TWO_WAY: Estimate.TWO_WAY, PresetEstimate.THREE_WAY: Estimate.THREE_WAY}
PRESET_OF_ESTIMATE = {estimate: preset for preset, estimate in ESTIMATE_OF_PRESET.items()}


def user_dir() -> Path:
    return Path(folder_paths.get_user_directory(), *USER_SUBDIR)


def _valid_stems(folder: Path) -> dict[str, Path]:
    found = {}
    if not folder.is_dir():
        return found
    for path in sorted(folder.glob("*.json")):
        try:
            found[check_preset_name(path.stem)] = path
        except GuidanceInputError:
            log.warning("Ignoring preset file %s: its name is not a preset name.", path)
    return found


def shipped() -> dict[str, Path]:
    return _valid_stems(SHIPPED_DIR)


def available() -> dict[str, Path]:
    """Preset name to file: the shipped presets first, then the user's. A user file never hides a shipped one."""
    presets = shipped()
    for name, path in _valid_stems(user_dir()).items():
        if name in presets:
            log.warning("Ignoring preset file %s: %r is a shipped preset's name.", path, name)
            continue
        presets[name] = path
    return presets


def _path_of(name: str) -> Path:
    path = available().get(name)
    if path is None:
        raise GuidanceInputError(
            f"There is no preset named {name!r}. Presets are the pack's presets/ folder and {user_dir()}; "
            "a newly saved one appears in the list after refreshing the node definitions (press R)."
        )
    return path


def read(name: str) -> Preset:
    path = _path_of(name)
    with path.open("rb") as file:
        data = file.read(MAX_PRESET_BYTES + 1)
    return parse_preset(data, source=str(path))


def fingerprint(name: str) -> str:
    """Changes when the preset's file does, so that an edited preset is read again."""
    try:
        return hashlib.sha256(_path_of(name).read_bytes()).hexdigest()
    except (GuidanceInputError, OSError):
        return f"missing:{name}"


def write(preset: Preset, overwrite: bool) -> Path:
    """Write ``preset`` to the user's folder as ``<name>.json`` (atomically); returns the file's path."""
    name = check_preset_name(preset.name)
    if name in shipped():
        raise GuidanceInputError(f"{name!r} is a shipped preset, which stays as it is: save under another name.")
    folder = user_dir()
    path = folder / f"{name}.json"
    if path.resolve().parent != folder.resolve():  # check_preset_name already rules this out
        raise GuidanceInputError(f"Preset name {name!r} does not name a file in {folder}.")
    if path.exists() and not overwrite:
        raise GuidanceInputError(f"A preset named {name!r} exists ({path}): switch overwrite on, or choose another name.")
    folder.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(preset.to_json())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    log.info("Saved personalization guidance preset %r to %s.", name, path)
    return path
