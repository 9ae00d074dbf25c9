"""The words the nodes and the runtime share: what a weak model is, which estimate, which route, and the settings of
one guided MODEL. Each value checks its own rules where it is built, so that a node, a test or a benchmark cannot
make one that the runtime would have to check again.

Nothing here touches ComfyUI's sampling: the nodes import this module, not the engine (``runtime.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from functools import cached_property
from typing import TYPE_CHECKING

from ...guidance import BlockSpec, GuidanceInputError, OmegaSchedule, block_factors, check_scale, check_unit_interval

if TYPE_CHECKING:
    from .pairs import FinetunedPair

# The key of the pack's wrappers and additional models on a MODEL.
WRAPPER_KEY = "personalization_guidance"
# The conds key under which the null conditioning rides along with positive and negative.
NULL_KEY = "pg_null"
# Index of each evaluation in the list handed to calc_cond_batch. The weak null evaluation takes
# CFG's uncond slot (1), so pre-CFG hooks and attention patches that look for "uncond" find it.
FT_POSITIVE, WEAK_NULL, FT_NEGATIVE = 0, 1, 2


class Estimate(str, Enum):
    TWO_WAY = "two-way (paper)"
    THREE_WAY = "three-way"


class Route(str, Enum):
    """Where the weak null evaluation runs."""

    ROWS = "rows of the batched forward"  # with the fine-tuned evaluations, as CFG batches uncond with cond
    OWN_FORWARD = "a forward of its own"


@dataclass(frozen=True)
class WeakModel:
    """What the Weak Model node outputs: the pair and omega over the run."""

    pair: FinetunedPair
    schedule: OmegaSchedule  # validated where it is built (guidance.schedule)
    # Omega per block (guidance.blocks; docs/design.md, "Omega per block"); None or off: one omega for every layer.
    blocks: BlockSpec | None = None

    def __post_init__(self):
        if self.blocks is not None and not isinstance(self.blocks, BlockSpec):
            raise GuidanceInputError(f"per_block must be a block setting, got {type(self.blocks).__name__}.")
        if self.blocks is not None and self.blocks.is_off:
            object.__setattr__(self, "blocks", None)

    @cached_property
    def factors(self) -> dict[str, float]:
        """Each changed module's block factor, by its path in ``pair.deltas``; empty when per-block is off.

        Resolved once from the module paths (a preset or free-form line that matches no changed layer is refused
        here, before sampling)."""
        if self.blocks is None:
            return {}
        prefix = "diffusion_model."
        changed = [path.removeprefix(prefix) for path in self.pair.deltas]
        model = [name for name, _ in self.pair.finetuned.model.diffusion_model.named_parameters()]
        return {prefix + path: f for path, f in block_factors(self.blocks, changed, model).items()}


@dataclass(frozen=True)
class RowScales:
    """Per-row omega and scales, for combinations sampled as rows of one latent batch (PG Sweep).

    One value per row of the latent batch; None keeps the config's value. Omega is
    constant over the run for each row.
    """

    omega: tuple[float, ...]
    lambda_t: tuple[float, ...] | None = None
    lambda_p: tuple[float, ...] | None = None

    def __post_init__(self):
        if not self.omega:
            raise GuidanceInputError("Per-row guidance needs at least one row.")
        object.__setattr__(self, "omega", tuple(check_unit_interval("omega", v) for v in self.omega))
        for name in ("lambda_t", "lambda_p"):
            values = getattr(self, name)
            if values is None:
                continue
            if len(values) != len(self.omega):
                raise GuidanceInputError(f"Per-row guidance: {len(values)} values of {name} for "
                                         f"{len(self.omega)} rows.")
            object.__setattr__(self, name, tuple(check_scale(name, v) for v in values))


@dataclass(frozen=True)
class GuidanceConfig:
    """Everything the runtime needs besides the conds and the sampler's cfg.

    The sampler's cfg is lambda (two-way) or lambda_t (three-way); ``lambda_p`` is
    the three-way personalization scale. The weak model sees ``null`` when given,
    else the sampler's negative, which then is also the three-way's n.
    """

    weak: WeakModel
    estimate: Estimate = Estimate.TWO_WAY
    lambda_p: float = 1.0
    # The null conditioning, when it is not the sampler's negative (three-way with a negative prompt).
    null: list | None = None
    # Per-row values: where given, they replace omega of ``weak.schedule`` and the scales, row by row.
    rows: RowScales | None = None
    # The route, when a test or benchmark wants one; None lets the runtime choose (``routing.py``).
    route: Route | None = None

    def __post_init__(self):
        try:
            object.__setattr__(self, "estimate", Estimate(self.estimate))
        except ValueError:
            raise GuidanceInputError(f"Unknown estimate {self.estimate!r}: choose one of "
                                     f"{', '.join(e.value for e in Estimate)}.") from None
        if self.estimate == Estimate.THREE_WAY:
            object.__setattr__(self, "lambda_p", check_scale("personalization_scale", self.lambda_p))
        if self.route is not None:
            object.__setattr__(self, "route", Route(self.route))


class RowOmegasUnavailable(GuidanceInputError):
    """One omega per latent row (PG Sweep's batched combinations) cannot be served for this model and pair."""

    def __init__(self, where: str):
        super().__init__(f"Personalization guidance cannot give each row its own omega here ({where}): sample the "
                         "combinations one after another.")


__all__ = [
    "FT_NEGATIVE",
    "FT_POSITIVE",
    "NULL_KEY",
    "WEAK_NULL",
    "WRAPPER_KEY",
    "Estimate",
    "GuidanceConfig",
    "Route",
    "RowOmegasUnavailable",
    "RowScales",
    "WeakModel",
]
