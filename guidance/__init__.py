"""Personalization guidance math: pure torch, no ComfyUI.

The estimates (``estimates``), omega over the run (``schedule``) and weight deltas
(``deltas``) of SPEC.md. The ComfyUI nodes in ``nodes/`` only wire these.
"""

from .deltas import (
    DenseDelta,
    LayerDelta,
    LowRankDelta,
    add_weak_correction,
    check_finite,
    check_layer,
    check_same_architecture,
    layer_response,
    rows_for_layer,
    unet_state_dict,
    weight_delta,
)
from .errors import GuidanceInputError
from .estimates import Evaluations, cfg, check_scale, combine, plan_evaluations, three_way, two_way
from .schedule import OmegaSchedule, OmegaShape, check_unit_interval, omega_at

__all__ = [
    "DenseDelta",
    "Evaluations",
    "GuidanceInputError",
    "LayerDelta",
    "LowRankDelta",
    "OmegaSchedule",
    "OmegaShape",
    "add_weak_correction",
    "cfg",
    "check_finite",
    "check_layer",
    "check_same_architecture",
    "check_scale",
    "check_unit_interval",
    "combine",
    "layer_response",
    "omega_at",
    "plan_evaluations",
    "rows_for_layer",
    "three_way",
    "two_way",
    "unet_state_dict",
    "weight_delta",
]
