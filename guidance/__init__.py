"""Personalization guidance math: pure torch, no ComfyUI.

The estimates (``estimates``), omega over the run (``schedule``) and weight deltas
(``deltas``) of SPEC.md. The ComfyUI nodes in ``nodes/`` only wire these. For the
tuning nodes: the run step by step (``steps``), sweep value lists (``sweep``) and
preset files (``presets``).
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
    prepare_correction,
    rows_for_layer,
    unet_state_dict,
    weak_parameter,
    weight_delta,
)
from .errors import GuidanceInputError
from .estimates import (
    EstimateWeights,
    Evaluations,
    cfg,
    check_scale,
    combine,
    estimate_weights,
    plan_evaluations,
    plan_for_rows,
    three_way,
    two_way,
)
from .presets import Preset, PresetEstimate, check_preset_name, parse_preset, preset_from_dict
from .schedule import OmegaSchedule, OmegaShape, check_unit_interval, omega_at
from .steps import StepGuidance, guidance_per_step
from .sweep import parse_values, sweep_combinations

__all__ = [
    "DenseDelta",
    "EstimateWeights",
    "Evaluations",
    "GuidanceInputError",
    "LayerDelta",
    "LowRankDelta",
    "OmegaSchedule",
    "OmegaShape",
    "Preset",
    "PresetEstimate",
    "StepGuidance",
    "add_weak_correction",
    "cfg",
    "check_finite",
    "check_layer",
    "check_preset_name",
    "check_same_architecture",
    "check_scale",
    "check_unit_interval",
    "combine",
    "estimate_weights",
    "guidance_per_step",
    "layer_response",
    "omega_at",
    "parse_preset",
    "parse_values",
    "plan_evaluations",
    "plan_for_rows",
    "prepare_correction",
    "preset_from_dict",
    "rows_for_layer",
    "sweep_combinations",
    "three_way",
    "two_way",
    "unet_state_dict",
    "weak_parameter",
    "weight_delta",
]
