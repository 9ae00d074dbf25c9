"""Inputs of the tuning nodes (sweep, schedule preview, presets) that mirror the guider's and the interpolator's.

They are taken from those nodes' own schemas, so that ranges, defaults and
tooltips cannot drift apart; a copy may get a tooltip of its own.
"""

from __future__ import annotations

import copy

from comfy_api.latest import io

from .guider import PersonalizationGuider
from .sockets import CATEGORY
from .weak_model import WeakModelInterpolator

TUNING_CATEGORY = f"{CATEGORY}/tuning"
SCHEDULE_INPUTS = ("schedule", "omega", "omega_end", "guidance_start", "guidance_end")


def input_of(node: type[io.ComfyNode], name: str, tooltip: str | None = None):
    """A copy of ``node``'s input ``name``, with ``tooltip`` in place of its own when given."""
    (found,) = [i for i in node.define_schema().inputs if i.id == name]
    found = copy.copy(found)
    if tooltip is not None:
        found.tooltip = tooltip
    return found


def guidance_scale_input(tooltip: str | None = None) -> io.Float.Input:
    """The guider's guidance_scale: lambda (two-way) or lambda_t (three-way)."""
    return input_of(PersonalizationGuider, "guidance_scale", tooltip)


def schedule_inputs() -> list:
    """The Weak Model Interpolator's schedule widgets: schedule, omega, omega_end, guidance_start, guidance_end."""
    return [input_of(WeakModelInterpolator, name) for name in SCHEDULE_INPUTS]
