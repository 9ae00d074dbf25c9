"""A pair from two separately loaded models: the base and a full (DreamBooth) fine-tune of it.

Forming streams: the names and shapes of both models are compared, and every changed
parameter placed by ``guidance.layers``, before any weight is read; the memory it will take
is estimated and a pair that cannot fit is refused with the figures; then each delta is
formed tensor by tensor in fp32 and stored in its final dtype at once
(``guidance.tensor_delta``). Nothing of the base model is kept. With the low-rank option each
Linear/Conv weight delta is kept as its truncated SVD instead.

Where either model holds GGUF weights (ComfyUI-GGUF), a dense delta would be several times the
size of the quantized files: the exact pair keeps no delta for parameters of layer kinds but
reads both models each time such a layer runs (``pairs.LazyDelta``), so that it holds the two
models as loaded plus one layer in the compute dtype.
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
    check_memory,
    collect,
    effective,
    log_routes,
    low_rank_candidate,
    placements_of,
    stored_dtype,
)

log = logging.getLogger(__name__)


def memory_needed(shapes: dict[str, torch.Size], dtypes: dict[str, torch.dtype], stored: torch.dtype,
                  low_rank: LowRankSpec | None, low_rankable: set[str], lazy: set[str] = frozenset()) -> tuple[int, int]:
    """Bytes a pair may add in system memory: (the delta kept, the most held at once while forming one tensor).

    The delta is counted as if every floating tensor changed (what a full fine-tune does). With the low-rank
    option a weight counts its factors at ``rank`` (or in full when uncapped), and its SVD's workspace. A lazy
    delta keeps nothing; reading it takes both sides of one layer in fp32, each dequantized through fp16 where it is
    GGUF (sampling then forms the weak weights in place of the base's).
    """
    size = torch.empty((), dtype=stored).element_size()
    kept, transient = 0, 0
    for key, shape in shapes.items():
        if not dtypes[key].is_floating_point:
            continue
        n = math.prod(shape)
        if key in lazy:  # both sides read in fp32, each through an fp16 dequantization for GGUF
            transient = max(transient, (4 + 2) * 2 * n)
        elif low_rank is not None and key in low_rankable:
            rows, cols = shape[0], n // shape[0]
            r = min(rows, cols) if low_rank.rank == 0 else min(low_rank.rank, rows, cols)
            kept += min(r * (rows + cols), n) * size
            transient = max(transient, 4 * (3 * n + min(rows, cols) * (rows + cols)))  # delta, U, Vh in fp32
        else:
            kept += n * size
            transient = max(transient, 4 * 2 * n)  # the fp32 delta and one fp32 copy while patches apply
    return kept, transient


@dataclass(frozen=True)
class _Plan:
    """What forming a full pair will do, from the two models' structure alone (no weight read)."""

    keys: list[str]
    shapes: dict[str, torch.Size]
    placements: dict[str, ChangedParameter]
    stored: torch.dtype
    low_rankable: set[str]
    lazy: set[str]  # keys read from both models while sampling (layer kinds of exact pairs with a GGUF side)
    memory: tuple[int, int]  # bytes kept, bytes held at once while forming (``memory_needed``)


def plan_pair(base: comfy.model_patcher.ModelPatcher, finetuned: comfy.model_patcher.ModelPatcher,
              low_rank: LowRankSpec | None = None) -> _Plan:
    """Names and shapes compared, every parameter placed by ``guidance.layers``, the memory estimated: before any
    weight is read."""
    base_sd = host.model_tensors(base, DIFFUSION_PREFIX)
    ft_sd = host.model_tensors(finetuned, DIFFUSION_PREFIX)
    shapes = {k: host.true_shape(v) for k, v in ft_sd.items()}
    check_same_architecture({k: host.true_shape(v) for k, v in base_sd.items()}, shapes)
    dtypes = {k: host.float_dtype(v) for k, v in ft_sd.items()}
    _check_unreadable(base_sd, ft_sd, dtypes)
    keys = sorted(k for k in shapes if dtypes[k].is_floating_point)
    placements = placements_of(finetuned, keys)
    stored = stored_dtype(finetuned)
    low_rankable = {k for k in keys if low_rank_candidate(placements[k], finetuned, shapes[k])}
    lazy = set()
    if low_rank is None and (host.has_gguf(base) or host.has_gguf(finetuned)):  # read as layers run, no delta kept
        lazy = {k for k in keys if placements[k].kind is not None and not placements[k].reason}
    memory = memory_needed(shapes, dtypes, stored, low_rank, low_rankable, lazy)
    return _Plan(keys, shapes, placements, stored, low_rankable, lazy, memory)


def _check_unreadable(base_sd: dict, ft_sd: dict, dtypes: dict) -> None:
    """Tensors that are not floating point (integer buffers) carry no personalization: refuse, naming it, a pair in
    which one differs, rather than leave it out."""
    for key, dtype in dtypes.items():
        if not dtype.is_floating_point and not torch.equal(host.plain(base_sd[key]), host.plain(ft_sd[key])):
            raise GuidanceInputError(
                f"The fine-tuned model differs from the base in {key}, a {str(dtype).removeprefix('torch.')} tensor "
                "that personalization guidance cannot interpolate. Check that both files are of the same model."
            )


def pair_from_models(base: comfy.model_patcher.ModelPatcher, finetuned: comfy.model_patcher.ModelPatcher,
                     low_rank: LowRankSpec | None = None) -> FinetunedPair:
    """Form the pair from two MODELs: a clone with extra (LoRA) patches, or two separate models.

    ``low_rank``: keep each Linear/Conv weight delta as its truncated SVD (an approximation; the log says how
    close). For a LoRA pair it changes nothing: LoRA factors are low-rank already.
    """
    if finetuned.is_clone(base):
        return pair_from_clone(base, finetuned)
    plan = plan_pair(base, finetuned, low_rank)
    check_memory(*plan.memory, "the pair")
    keys, placements, stored, low_rankable = plan.keys, plan.placements, plan.stored, plan.low_rankable
    compute = finetuned.load_device if finetuned.load_device.type == "cuda" else torch.device("cpu")

    base_weights = host.key_entries(base, DIFFUSION_PREFIX)
    ft_weights = host.key_entries(finetuned, DIFFUSION_PREFIX)
    dense: dict[str, torch.Tensor] = {}
    factors: dict[str, list[LayerDelta]] = {}
    lazy = {key for key in sorted(plan.lazy) if _differs(base, finetuned, key, base_weights[key], ft_weights[key])}
    size = torch.empty((), dtype=stored).element_size()
    approximated = [0, 0.0, 0.0, 0]  # layers, squared norm of the deltas, squared norm of the errors, bytes saved
    for key in keys:
        if key in plan.lazy:
            continue
        approximate = low_rank is not None and key in low_rankable
        d = _delta(base, finetuned, key, base_weights[key], ft_weights[key], torch.float32 if approximate else stored)
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
    changed = {k: placements[k] for k in (*dense, *factors, *lazy)}
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
    pair = FinetunedPair(finetuned=finetuned, deltas=collect(finetuned, dense, factors, lazy, base),
                         placements=changed, approximation=approximation, reads_base=base if lazy else None)
    if lazy:
        _warn_coarse_quantization(base, finetuned, lazy)
    log.info("Personalization guidance: pair formed, %d changed tensors, delta %.2f GiB in %s%s.",
             len(changed), pair.delta_bytes() / GIB, str(stored).removeprefix("torch."),
             f"; {len(lazy)} GGUF tensors read from both models as each layer runs (no delta kept)" if lazy else "")
    return pair


def _delta(base: comfy.model_patcher.ModelPatcher, finetuned: comfy.model_patcher.ModelPatcher, key: str,
           base_entry: list, ft_entry: list, dtype: torch.dtype) -> torch.Tensor | None:
    """finetuned - base for one key, from the unpatched originals and the patches ``get_key_patches`` lists, stored
    as ``dtype``."""
    (base_weight, base_convert), *base_patches = base_entry
    (ft_weight, ft_convert), *ft_patches = ft_entry
    plain = not base_patches and not ft_patches and not any(
        host.is_quantized(w) or host.is_gguf(w) for w in (base_weight, ft_weight))
    if plain:
        # The common case: no patches, no conversion (a convert function only exists with patches to apply).
        return tensor_delta(key, base_weight.detach().cpu(), ft_weight.detach(), dtype)
    with host.patch_problems() as problems:
        base_eff = effective(base, key, base_weight, base_convert, base_patches)
        ft_eff = effective(finetuned, key, ft_weight, ft_convert, ft_patches)
    _refuse_patch_problems(key, problems)
    return tensor_delta(key, base_eff, ft_eff, dtype)


def _differs(base: comfy.model_patcher.ModelPatcher, finetuned: comfy.model_patcher.ModelPatcher, key: str,
             base_entry: list, ft_entry: list) -> bool:
    """Whether a lazily read key differs between the models, one layer read at a time (identical packed bytes of one
    type, with no patches on either side, dequantize identically and are not read). Non-finite values are refused."""
    (base_weight, base_convert), *base_patches = base_entry
    (ft_weight, ft_convert), *ft_patches = ft_entry
    if (not base_patches and not ft_patches and host.is_gguf(base_weight) and host.is_gguf(ft_weight)
            and base_weight.tensor_type == ft_weight.tensor_type
            and torch.equal(host.plain(base_weight), host.plain(ft_weight))):
        return False
    with host.patch_problems() as problems:
        ft_value = effective(finetuned, key, ft_weight, ft_convert, ft_patches)
        if not bool(torch.isfinite(ft_value).all()):
            raise GuidanceInputError(f"The fine-tuned model holds NaN or Inf in {key}.")
        base_value = effective(base, key, base_weight, base_convert, base_patches)
        if not bool(torch.isfinite(base_value).all()):
            raise GuidanceInputError(f"The base model holds NaN or Inf in {key}.")
    _refuse_patch_problems(key, problems)
    return not torch.equal(base_value, ft_value)


def _refuse_patch_problems(key: str, problems: list[str]) -> None:
    if problems:
        raise GuidanceInputError(
            f"ComfyUI could not apply the patches on {key} (a LoRA or another adapter on one of the models), so that "
            f"model would sample without them: {problems[0]}. Remove that adapter, or use one made for this model."
        )


# GGUF types that keep a fine-tune's direction between two separately quantized files; coarser ones may not.
_FINE_GGUF_TYPES = {"F32", "F16", "BF16", "Q8_0"}


def _warn_coarse_quantization(base: comfy.model_patcher.ModelPatcher, finetuned: comfy.model_patcher.ModelPatcher,
                              keys: set[str]) -> None:
    """Say so when a full pair's GGUF files are quantized more coarsely than Q8_0: the difference of two separately
    quantized files holds both files' rounding as well as the fine-tune, and below Q8_0 the rounding can outweigh a
    small fine-tune. The guidance is exact for the files as given."""
    types = set()
    for model in (base, finetuned):
        tensors = host.model_tensors(model, DIFFUSION_PREFIX)
        types |= {getattr(tensors[k].tensor_type, "name", "?") for k in keys if host.is_gguf_packed(tensors[k])}
    coarse = sorted(types - _FINE_GGUF_TYPES)
    if coarse:
        log.warning("Personalization guidance: the pair's GGUF files are quantized to %s. The difference between two "
                    "separately quantized files is the fine-tune plus both files' rounding, which below Q8_0 can "
                    "outweigh a small fine-tune: the guidance follows the files exactly, so it may push toward "
                    "rounding noise. Q8_0 or BF16 files, or the personalization as a LoRA, keep its direction.",
                    ", ".join(coarse))
