"""A pair from two separately loaded models: the base and a full (DreamBooth) fine-tune of it.

Forming streams: the names and shapes of both models are compared, and every changed
parameter placed by ``guidance.layers``, before any weight is read; the memory it will take
is estimated and a pair that cannot fit is refused with the figures; then each delta is
formed tensor by tensor in fp32 and stored in its final dtype at once
(``guidance.tensor_delta``). Nothing of the base model is kept. With the low-rank option each
Linear/Conv weight delta is kept as its truncated SVD instead.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import comfy.model_management
import comfy.model_patcher
import torch

from ...guidance import (
    ChangedParameter,
    GuidanceInputError,
    LayerDelta,
    check_same_architecture,
    low_rank_factors,
    tensor_delta,
)
from . import host
from .lora_pairs import pair_from_clone
from .pairs import (
    DIFFUSION_PREFIX,
    GIB,
    Approximation,
    FinetunedPair,
    LowRankSpec,
    collect,
    effective,
    log_routes,
    low_rank_candidate,
    placements_of,
    stored_dtype,
)

log = logging.getLogger(__name__)


def memory_needed(shapes: dict[str, torch.Size], dtypes: dict[str, torch.dtype], stored: torch.dtype,
                  low_rank: LowRankSpec | None, low_rankable: set[str]) -> tuple[int, int]:
    """Bytes a pair may add in system memory: (the delta kept, the most held at once while forming one tensor).

    The delta is counted as if every floating tensor changed (what a full fine-tune does). With the low-rank
    option a weight counts its factors at ``rank`` (or in full when uncapped), and its SVD's workspace.
    """
    size = torch.empty((), dtype=stored).element_size()
    kept, transient = 0, 0
    for key, shape in shapes.items():
        if not dtypes[key].is_floating_point:
            continue
        n = math.prod(shape)
        if low_rank is not None and key in low_rankable:
            rows, cols = shape[0], n // shape[0]
            r = min(rows, cols) if low_rank.rank == 0 else min(low_rank.rank, rows, cols)
            kept += min(r * (rows + cols), n) * size
            transient = max(transient, 4 * (3 * n + min(rows, cols) * (rows + cols)))  # delta, U, Vh in fp32
        else:
            kept += n * size
            transient = max(transient, 4 * 2 * n)  # the fp32 delta and one fp32 copy while patches apply
    return kept, transient


def _check_memory(kept: int, transient: int, what: str) -> None:
    """Refuse, with the figures, a pair that would not fit in free system memory (ComfyUI's own reading)."""
    free = comfy.model_management.get_free_memory(torch.device("cpu"))
    if kept + transient > free:
        raise GuidanceInputError(
            f"Forming {what} needs up to {kept / GIB:.2f} GiB of system memory for the delta plus "
            f"{transient / GIB:.2f} GiB while forming, and {free / GIB:.2f} GiB is free. Free memory (close other "
            "programs, unload other models), load both models in a narrower weight dtype, or use the low-rank "
            "option (a smaller rank)."
        )


@dataclass(frozen=True)
class _Plan:
    """What forming a full pair will do, from the two models' structure alone (no weight read)."""

    keys: list[str]
    shapes: dict[str, torch.Size]
    placements: dict[str, ChangedParameter]
    stored: torch.dtype
    low_rankable: set[str]
    memory: tuple[int, int]  # bytes kept, bytes held at once while forming (``memory_needed``)


def plan_pair(base: comfy.model_patcher.ModelPatcher, finetuned: comfy.model_patcher.ModelPatcher,
              low_rank: LowRankSpec | None = None) -> _Plan:
    """Names and shapes compared, every parameter placed by ``guidance.layers``, the memory estimated: before any
    weight is read."""
    base_sd = base.model_state_dict(DIFFUSION_PREFIX)
    ft_sd = finetuned.model_state_dict(DIFFUSION_PREFIX)
    check_same_architecture({k: v.shape for k, v in base_sd.items()}, {k: v.shape for k, v in ft_sd.items()})
    shapes = {k: v.shape for k, v in ft_sd.items()}
    dtypes = {k: host.float_dtype(v) for k, v in ft_sd.items()}
    keys = sorted(k for k in shapes if dtypes[k].is_floating_point)
    placements = placements_of(finetuned, keys)
    stored = stored_dtype(finetuned)
    low_rankable = {k for k in keys if low_rank_candidate(placements[k], finetuned, shapes[k])}
    memory = memory_needed(shapes, dtypes, stored, low_rank, low_rankable)
    return _Plan(keys, shapes, placements, stored, low_rankable, memory)


def pair_from_models(base: comfy.model_patcher.ModelPatcher, finetuned: comfy.model_patcher.ModelPatcher,
                     low_rank: LowRankSpec | None = None) -> FinetunedPair:
    """Form the pair from two MODELs: a clone with extra (LoRA) patches, or two separate models.

    ``low_rank``: keep each Linear/Conv weight delta as its truncated SVD (an approximation; the log says how
    close). For a LoRA pair it changes nothing: LoRA factors are low-rank already.
    """
    if finetuned.is_clone(base):
        return pair_from_clone(base, finetuned)
    plan = plan_pair(base, finetuned, low_rank)
    _check_memory(*plan.memory, "the pair")
    keys, placements, stored, low_rankable = plan.keys, plan.placements, plan.stored, plan.low_rankable
    compute = finetuned.load_device if finetuned.load_device.type == "cuda" else torch.device("cpu")

    base_weights = base.get_key_patches(DIFFUSION_PREFIX)
    ft_weights = finetuned.get_key_patches(DIFFUSION_PREFIX)
    dense: dict[str, torch.Tensor] = {}
    factors: dict[str, list[LayerDelta]] = {}
    size = torch.empty((), dtype=stored).element_size()
    approximated = [0, 0.0, 0.0, 0]  # layers, squared norm of the deltas, squared norm of the errors, bytes saved
    for key in keys:
        approximate = low_rank is not None and key in low_rankable
        d = _delta(key, base_weights[key], ft_weights[key], torch.float32 if approximate else stored)
        if d is None:
            continue
        if approximate:
            # The decomposition on the GPU where there is one: one layer at a time, minutes less on a CPU.
            lr = low_rank_factors(d.to(compute), low_rank.rank, low_rank.energy)
            if lr is not None:
                norm2 = float(torch.linalg.vector_norm(d)) ** 2
                approximated[0] += 1
                approximated[1] += norm2
                approximated[2] += norm2 * max(0.0, 1.0 - lr.kept)
                lr.up, lr.down = lr.up.to("cpu", stored), lr.down.to("cpu", stored)
                approximated[3] += (d.numel() - lr.up.numel() - lr.down.numel()) * size
                factors[key] = [lr]
                continue
        dense[key] = d if d.dtype == stored else d.to(stored)  # an approximation that would not be smaller
    del base_weights, ft_weights
    changed = {k: placements[k] for k in (*dense, *factors)}
    if not changed:
        raise GuidanceInputError(
            "The fine-tuned model's weights are the base model's (every difference is zero): the pair has no "
            "personalization, and guidance would be plain CFG. Choose the fine-tuned checkpoint, not a copy of the base."
        )
    approximation = None
    if approximated[0]:
        approximation = Approximation(approximated[0], 1.0 - approximated[2] / approximated[1],
                                      math.sqrt(approximated[2] / approximated[1]), approximated[3])
        log.info("Personalization guidance: low-rank pair, %d weight deltas approximated (rank <= %s, energy %g): "
                 "they keep %.4f of the delta's squared norm (relative error %.4f), %.2f GiB smaller.",
                 approximation.layers, low_rank.rank or "no cap", low_rank.energy, approximation.kept_energy,
                 approximation.relative_error, approximation.bytes_saved / GIB)
    log_routes(changed)
    pair = FinetunedPair(finetuned=finetuned, deltas=collect(finetuned, dense, factors), placements=changed,
                         approximation=approximation)
    log.info("Personalization guidance: pair formed, %d changed tensors, delta %.2f GiB in %s.",
             len(changed), pair.delta_bytes() / GIB, str(stored).removeprefix("torch."))
    return pair


def _delta(key: str, base_entry: list, ft_entry: list, dtype: torch.dtype) -> torch.Tensor | None:
    """finetuned - base for one key, from the unpatched originals and the patches ``get_key_patches`` lists, stored
    as ``dtype``."""
    (base_weight, base_convert), *base_patches = base_entry
    (ft_weight, ft_convert), *ft_patches = ft_entry
    plain = not base_patches and not ft_patches and not host.is_quantized(base_weight) and not host.is_quantized(ft_weight)
    if plain:
        # The common case: no patches, no conversion (a convert function only exists with patches to apply).
        return tensor_delta(key, base_weight.detach().cpu(), ft_weight.detach(), dtype)
    base_eff = effective(base_weight, base_convert, base_patches, key)
    return tensor_delta(key, base_eff, effective(ft_weight, ft_convert, ft_patches, key), dtype)

