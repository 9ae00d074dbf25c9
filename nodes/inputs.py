"""Inputs that the Personalization Guider and the KSampler patch share."""

from comfy_api.latest import io

from .core.runtime import Estimate
from .sockets import WeakModelSocket


def model_input() -> io.Model.Input:
    return io.Model.Input(
        "model",
        tooltip="The fine-tuned MODEL of the pair (or a model made from it, e.g. with another LoRA on top).",
    )


def weak_model_input() -> WeakModelSocket.Input:
    return WeakModelSocket.Input("weak_model", tooltip="From the Weak Model Interpolator.")


def estimate_input() -> io.Combo.Input:
    return io.Combo.Input(
        "estimate",
        options=Estimate,
        default=Estimate.TWO_WAY,
        tooltip="two-way (the paper): D_w(null) + lambda (D_ft(c) - D_w(null)), 2 model evaluations per step. "
        "three-way (this pack's extension): adds a negative prompt n and a separate personalization scale, "
        "3 evaluations per step (2 when the scales are equal).",
    )


def personalization_scale_input() -> io.Float.Input:
    return io.Float.Input(
        "personalization_scale",
        default=3.0,
        min=0.0,
        max=100.0,
        step=0.1,
        round=0.01,
        tooltip="Three-way only: lambda_p, the pull from the weak model's null prediction toward the fine-tuned "
        "negative prediction. 1 turns personalization guidance off (plain CFG with the negative); equal to the "
        "text scale gives the two-way estimate.",
    )
