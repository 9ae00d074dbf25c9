"""Personalization guidance math: pure torch, no ComfyUI.

The estimates (``estimates``), omega over the run (``schedule``), weight deltas
(``deltas``), omega per block (``blocks``) and the table of layer kinds (``layers``) of docs/design.md. The ComfyUI nodes
in ``nodes/`` only wire these. For the tuning nodes: the run step by step (``steps``),
sweep value lists (``sweep``) and preset files (``presets``).
"""

from .blocks import BlockPreset, BlockSpec, block_factors, block_omega, parse_block_setting, parse_free_form
from .deltas import (
    DenseDelta,
    LayerDelta,
    LowRankDelta,
    add_weak_correction,
    check_finite,
    check_layer,
    check_same_architecture,
    layer_response,
    low_rank_factors,
    prepare_correction,
    tensor_delta,
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
from .layers import (
    LAYER_KINDS,
    ROW_MIXING,
    ChangedParameter,
    LayerKind,
    Placement,
    layer_kind,
    place_parameter,
)
from .presets import Preset, PresetEstimate, check_preset_name, parse_preset, preset_from_dict
from .schedule import (
    OmegaSchedule,
    OmegaShape,
    check_unit_interval,
    in_interval,
    omega_at,
    omega_at_sigma,
    progress_of_sigma,
)
from .steps import StepGuidance, guidance_per_step
from .sweep import parse_values, sweep_combinations

__all__ = [
    "BlockPreset",
    "BlockSpec",
    "LAYER_KINDS",
    "ROW_MIXING",
    "ChangedParameter",
    "DenseDelta",
    "EstimateWeights",
    "Evaluations",
    "GuidanceInputError",
    "LayerDelta",
    "LayerKind",
    "LowRankDelta",
    "OmegaSchedule",
    "OmegaShape",
    "Placement",
    "Preset",
    "PresetEstimate",
    "StepGuidance",
    "add_weak_correction",
    "block_factors",
    "block_omega",
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
    "in_interval",
    "layer_kind",
    "layer_response",
    "low_rank_factors",
    "omega_at",
    "omega_at_sigma",
    "parse_block_setting",
    "parse_free_form",
    "parse_preset",
    "parse_values",
    "place_parameter",
    "plan_evaluations",
    "plan_for_rows",
    "prepare_correction",
    "preset_from_dict",
    "progress_of_sigma",
    "sweep_combinations",
    "tensor_delta",
    "three_way",
    "two_way",
    "unet_state_dict",
    "weak_parameter",
    "weight_delta",
]
