"""Inputs that the sampling nodes share: the guider's, the KSampler patch's and the tuning nodes'. (The pair
loaders' inputs are in ``core/personalization.py``.)

``estimate`` is a DynamicCombo (``core/modes.py``): two-way shows the one scale
lambda; three-way shows lambda_t, lambda_p and, where the node takes one, the
negative prompt socket. So a negative prompt cannot be connected in two-way, and
the KSampler patch's null_conditioning is a required socket in three-way only:
ComfyUI reports either mistake when the workflow is queued, at that socket.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from comfy_api.latest import io

from .core.modes import Mode, mode_input
from .core.vocabulary import Estimate
from .sockets import WeakModelSocket

ESTIMATE = "estimate"


def model_input() -> io.Model.Input:
    return io.Model.Input(
        "model",
        tooltip="The fine-tuned MODEL of the pair (or a model made from it, e.g. with another LoRA on top).",
    )


def weak_model_input() -> WeakModelSocket.Input:
    return WeakModelSocket.Input(
        "weak_model", tooltip="From the Personalization Weak Model (or the Personalization Preset Loader)."
    )


def guidance_scale_input(tooltip: str | None = None) -> io.Float.Input:
    """lambda (two-way) or lambda_t (three-way), with CFG's range."""
    return io.Float.Input(
        "guidance_scale", default=7.5, min=0.0, max=100.0, step=0.1, round=0.01,
        tooltip=tooltip or "lambda (two-way), or lambda_t, the text scale between the prompt and the negative "
        "prompt n (three-way): like CFG's scale. 1 samples the fine-tuned model on the prompt alone (no guidance, "
        "one evaluation per step).",
    )


def personalization_scale_input(tooltip: str | None = None) -> io.Float.Input:
    return io.Float.Input(
        "personalization_scale",
        default=3.0,
        min=0.0,
        max=100.0,
        step=0.1,
        round=0.01,
        tooltip=tooltip or "lambda_p, the pull from the weak model's null prediction toward the fine-tuned negative "
        "prediction. 1 turns personalization guidance off (plain CFG with the negative); equal to guidance_scale "
        "gives the two-way estimate.",
    )


def negative_input() -> io.Conditioning.Input:
    return io.Conditioning.Input(
        "negative",
        optional=True,
        tooltip="The negative prompt n, encoded with the pair's CLIP. Leave unconnected to use the null prompt.",
    )


ESTIMATES = (
    "two-way (the paper): D_w(null) + lambda (D_ft(c) - D_w(null)), 2 model evaluations per step. three-way (this "
    "pack's extension): adds a negative prompt n and a separate personalization scale, 3 evaluations per step (2 "
    "when the scales are equal). "
)


def estimate_input(two_way: Sequence[io.Input], three_way: Sequence[io.Input], shown: str) -> io.DynamicCombo.Input:
    """The estimate and the inputs each estimate shows; ``shown`` says which, for the tooltip."""
    return mode_input(ESTIMATE, {Estimate.TWO_WAY: two_way, Estimate.THREE_WAY: three_way}, tooltip=ESTIMATES + shown)


def guider_estimate_input() -> io.DynamicCombo.Input:
    """The Personalization Guider's estimate: two-way shows lambda; three-way lambda_t, lambda_p and negative."""
    return estimate_input(
        two_way=[guidance_scale_input()],
        three_way=[negative_input(), guidance_scale_input(), personalization_scale_input()],
        shown="Two-way shows guidance_scale (lambda); three-way the negative socket, guidance_scale (lambda_t) and "
        "personalization_scale (lambda_p).",
    )


def estimate_of(estimate: Mapping[str, Any] | str, **flat) -> Mode[Estimate]:
    """The estimate and its inputs, from ComfyUI's value of ``estimate`` or from a name with keyword inputs."""
    return Mode.of(Estimate, ESTIMATE, estimate, **flat)
