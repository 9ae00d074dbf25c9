"""Inputs that several nodes share: the guider's and the KSampler patch's, and the pair loaders' low-rank option."""

from enum import Enum

from comfy_api.latest import io

from .core.pairs import LowRankSpec
from .core.runtime import Estimate
from .sockets import WeakModelSocket


class FullDelta(str, Enum):
    """How a full pair keeps theta_ft - theta_pre."""

    EXACT = "exact"
    LOW_RANK = "low rank"


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


def low_rank_inputs() -> list:
    """A full pair's delta kept exactly, or as a truncated SVD per Linear/Conv weight (less memory, approximate)."""
    return [
        io.Combo.Input(
            "full_delta",
            options=FullDelta,
            default=FullDelta.EXACT,
            tooltip="Full fine-tunes only (a LoRA is low-rank already). exact: the whole weight delta, as large as "
            "the model (two weight sets while sampling). low rank: each Linear/Conv weight delta kept as its "
            "truncated SVD, a fraction of the memory; an approximation, whose error the log reports.",
        ),
        io.Int.Input(
            "rank",
            default=128,
            min=0,
            max=4096,
            tooltip="low rank: at most this many singular values per layer (0: no cap, energy alone decides). "
            "Higher is closer to exact and larger.",
        ),
        io.Float.Input(
            "energy",
            default=1.0,
            min=0.5,
            max=1.0,
            step=0.001,
            tooltip="low rank: keep the fewest singular values that hold this fraction of each layer's delta "
            "(its squared norm). 1 keeps all of them up to the rank.",
        ),
    ]


def low_rank_spec(full_delta: str, rank: int, energy: float) -> LowRankSpec | None:
    """The low-rank option as pair formation takes it: None for an exact delta."""
    return LowRankSpec(rank=rank, energy=energy) if FullDelta(full_delta) == FullDelta.LOW_RANK else None
