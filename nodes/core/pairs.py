"""A base model and its personalization, as ComfyUI objects, and the weight delta between them.

Forming a pair streams: the names and shapes of both models are compared, and every
changed parameter placed by ``guidance.layers``, before any weight is read; the memory
it will take is estimated and a pair that cannot fit is refused with the figures; then
each delta is formed tensor by tensor in fp32 and stored in its final dtype at once
(``guidance.tensor_delta``). Nothing of the base model is kept.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch

import comfy.lora
import comfy.lora_convert
import comfy.model_management
import comfy.model_patcher
import comfy.weight_adapter

from ...guidance import (
    ChangedParameter,
    DenseDelta,
    GuidanceInputError,
    LayerDelta,
    LowRankDelta,
    Placement,
    check_finite,
    check_layer,
    check_same_architecture,
    low_rank_factors,
    place_parameter,
    tensor_delta,
)
from . import host

log = logging.getLogger(__name__)

DIFFUSION_PREFIX = "diffusion_model."
GIB = 1024**3


class DeltaWeights(torch.nn.Module):
    """The pair's delta tensors as (frozen) parameters of one module.

    Wrapped in a ModelPatcher and attached to the fine-tuned MODEL as an additional
    model, ComfyUI loads them in the same ``load_models_gpu`` call as the model and
    counts them in its memory budget. The LayerDelta objects hold these very
    Parameter objects, so they follow the module to whatever device it is moved to.
    """

    def __init__(self, deltas: dict[str, list[LayerDelta]]):
        super().__init__()
        index = 0
        for layer_deltas in deltas.values():
            for delta in layer_deltas:
                tensors = delta.params if isinstance(delta, DenseDelta) else {"up": delta.up, "down": delta.down}
                for name, tensor in list(tensors.items()):
                    param = torch.nn.Parameter(tensor, requires_grad=False)
                    self.register_parameter(f"delta_{index}", param)
                    if isinstance(delta, DenseDelta):
                        delta.params[name] = param
                    else:
                        setattr(delta, name, param)
                    index += 1


@dataclass(frozen=True)
class LowRankSpec:
    """The low-rank option for full pairs: each Linear/Conv weight delta kept as its truncated SVD.

    ``rank``: at most this many singular values per layer (0: no cap). ``energy``: the
    fewest singular values that hold this fraction of the delta's squared norm.
    """

    rank: int = 64
    energy: float = 1.0

    def __post_init__(self):
        if self.rank < 0:
            raise GuidanceInputError(f"rank must be 0 (no cap) or more, got {self.rank}.")
        if not (math.isfinite(self.energy) and 0.0 < self.energy <= 1.0):
            raise GuidanceInputError(f"energy must be above 0 and at most 1, got {self.energy!r}.")


@dataclass(frozen=True)
class Approximation:
    """What the low-rank option kept: the squared norm of the approximated weight deltas, against the whole."""

    layers: int
    kept_energy: float  # fraction of the approximated deltas' squared norm the factors hold
    relative_error: float  # ||delta - factors|| / ||delta|| over the approximated weights
    bytes_saved: int


@dataclass
class FinetunedPair:
    """The fine-tuned MODEL and delta = theta_ft - theta_pre per module of its diffusion model.

    ``deltas`` maps a module's path in the BaseModel (``diffusion_model.…``) to the
    deltas that act on it: low-rank LoRA factors where they can be applied row by
    row, dense tensors otherwise. ``placements`` says, per changed parameter key, how
    ``guidance.layers`` places it (the runtime picks its route from them).
    """

    finetuned: comfy.model_patcher.ModelPatcher
    deltas: dict[str, list[LayerDelta]]
    placements: dict[str, ChangedParameter]
    dense_fallbacks: int = 0
    approximation: Approximation | None = None
    delta_patcher: comfy.model_patcher.ModelPatcher = field(init=False, repr=False)
    # Room for weak parameters, made by the runtime on first use where the pair samples with weak weights.
    workspace: comfy.model_patcher.ModelPatcher | None = field(default=None, init=False, repr=False)

    def __post_init__(self):
        self.delta_patcher = comfy.model_patcher.ModelPatcher(
            DeltaWeights(self.deltas), load_device=self.finetuned.load_device, offload_device=self.finetuned.offload_device
        )

    @property
    def takes_row_omegas(self) -> bool:
        """True when every change sits on a layer kind, so that rows of one batch can each have their own omega
        (PG Sweep's batched combinations); inline parameters take one omega per forward."""
        return all(p.kind is not None and not p.reason for p in self.placements.values())

    def delta_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for ds in self.deltas.values() for d in ds for t in d.tensors())

    def check_model(self, model: comfy.model_patcher.ModelPatcher) -> None:
        """Raise unless ``model`` holds the fine-tuned weights this pair's delta was formed against."""
        if not model.is_clone(self.finetuned):
            raise GuidanceInputError(
                "The MODEL given to personalization guidance is not the fine-tuned MODEL of this pair. "
                "Connect the MODEL output of the same 'Load Fine-tuned Pair' (or a model made from it)."
            )
        for key, patches in self.finetuned.patches.items():
            if model.patches.get(key, [])[: len(patches)] != patches:
                raise GuidanceInputError(
                    f"The MODEL given to personalization guidance has lost the fine-tuned patches of {key}: "
                    "connect the MODEL output of the pair, or a model made from it."
                )


def _split_key(key: str) -> tuple[str, str]:
    layer, _, param = key.rpartition(".")
    return layer, param


def _low_rank(patch: tuple) -> LowRankDelta | None:
    """The LoRA patch as low-rank factors, or None if it cannot be applied row by row."""
    strength, adapter, strength_model, offset, function = patch
    if strength_model != 1.0 or offset is not None or function is not None:
        return None
    if not isinstance(adapter, comfy.weight_adapter.LoRAAdapter):
        return None
    up, down, alpha, mid, dora_scale, reshape = adapter.weights
    if mid is not None or dora_scale is not None or reshape is not None:
        return None
    rank = down.shape[0]
    scale = strength * (alpha / rank if alpha is not None else 1.0)
    return LowRankDelta(up=up, down=down, scale=scale)


def _effective(weight, convert, patches, key: str) -> torch.Tensor:
    """One tensor as the model computes with it, in fp32 on the CPU: dequantized, converted, patched."""
    weight = host.float_tensor(weight.detach()).to("cpu", torch.float32, copy=True)
    weight = convert(weight, inplace=True)
    return comfy.lora.calculate_weight(patches, weight, key) if patches else weight


def stored_dtype(model: comfy.model_patcher.ModelPatcher) -> torch.dtype:
    """The dtype deltas are kept in: the model's own when that is fp16 or bf16 (half the memory), else its
    compute dtype when that is (fp8 weights computed in bf16), else fp32 (fp32 models)."""
    for dtype in (model.model_dtype(), getattr(model.model, "manual_cast_dtype", None)):
        if dtype in (torch.float16, torch.bfloat16):
            return dtype
    return torch.float32


def _placements(model: comfy.model_patcher.ModelPatcher, keys) -> dict[str, ChangedParameter]:
    return {key: place_parameter(model.model, key) for key in keys}


def _check_structure(placements: dict[str, ChangedParameter]) -> None:
    """Log how the changed parameters will be guided (SPEC.md: the log says which route and why)."""
    own = [p for p in placements.values() if p.placement == Placement.OWN_FORWARD]
    mixing = sorted({p.container for p in placements.values() if p.placement == Placement.IN_ROW_MIXING})
    if mixing:
        log.info("Personalization guidance: %d module(s) route tokens between rows inside (first: %s); they run "
                 "their weak rows in a call of their own.", len(mixing), mixing[0])
    if own:
        log.info("Personalization guidance: %d changed parameter(s) cannot be guided row by row (first: %s); the "
                 "weak evaluation runs as a forward of its own.", len(own), own[0].reason)


def _low_rank_candidate(placement: ChangedParameter, model: comfy.model_patcher.ModelPatcher, shape) -> bool:
    return (placement.placement == Placement.LAYER and placement.kind.low_rank and placement.name == "weight"
            and len(shape) >= 2 and getattr(model.model.get_submodule(placement.path), "groups", 1) == 1)


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
    placements = _placements(finetuned, keys)
    stored = stored_dtype(finetuned)
    low_rankable = {k for k in keys if _low_rank_candidate(placements[k], finetuned, shapes[k])}
    memory = memory_needed(shapes, dtypes, stored, low_rank, low_rankable)
    return _Plan(keys, shapes, placements, stored, low_rankable, memory)


def pair_from_models(base: comfy.model_patcher.ModelPatcher, finetuned: comfy.model_patcher.ModelPatcher,
                     low_rank: LowRankSpec | None = None) -> FinetunedPair:
    """Form the pair from two MODELs: a clone with extra (LoRA) patches, or two separate models.

    ``low_rank``: keep each Linear/Conv weight delta as its truncated SVD (an approximation; the log says how
    close). For a LoRA pair it changes nothing: LoRA factors are low-rank already.
    """
    if finetuned.is_clone(base):
        return _pair_from_clone(base, finetuned)
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
    _check_structure(changed)
    pair = FinetunedPair(finetuned=finetuned, deltas=_collect(finetuned, dense, factors), placements=changed,
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
    base_eff = _effective(base_weight, base_convert, base_patches, key)
    return tensor_delta(key, base_eff, _effective(ft_weight, ft_convert, ft_patches, key), dtype)


def _collect(model: comfy.model_patcher.ModelPatcher, dense: dict[str, torch.Tensor],
             low_rank: dict[str, list[LayerDelta]]) -> dict[str, list[LayerDelta]]:
    """Group per-tensor deltas by module, and check that each fits its module."""
    layers: dict[str, list[LayerDelta]] = {}
    for key, d in dense.items():
        path, param = _split_key(key)
        group = layers.setdefault(path, [])
        dense_delta = next((x for x in group if isinstance(x, DenseDelta)), None)
        if dense_delta is None:
            dense_delta = DenseDelta()
            group.append(dense_delta)
        dense_delta.params[param] = d
    for key, deltas in low_rank.items():
        layers.setdefault(_split_key(key)[0], []).extend(deltas)
    for path, deltas in layers.items():
        module = model.model.get_submodule(path)
        for d in deltas:
            if isinstance(d, LowRankDelta) or all(place_parameter(model.model, f"{path}.{p}").placement == Placement.LAYER
                                                  for p in d.params):
                check_layer(path, module, d)
    return layers


def _pair_from_clone(base: comfy.model_patcher.ModelPatcher, finetuned: comfy.model_patcher.ModelPatcher) -> FinetunedPair:
    """The fine-tuned MODEL is the base with extra patches (a LoRA): those patches are the delta.

    Plain LoRA patches stay low-rank and are applied row by row; any other patch
    (LoHa, LoKr, DoRA, LoCon with a mid weight, a ``.diff`` on a norm, …) becomes an
    exact dense delta, formed one tensor at a time.
    """
    if host.bypass_injections(finetuned) is not None and host.bypass_injections(base) is None:
        raise GuidanceInputError(
            "The fine-tuned MODEL carries its LoRA in bypass mode (Load LoRA (Bypass)), which adds the LoRA's output "
            "in the forward instead of patching weights: there is no weight delta to read. Load the personalization "
            "LoRA with Load LoRA (model only) or the pair loaders; LoRAs in bypass mode on top of the fine-tuned "
            "MODEL are fine."
        )
    low_rank: dict[str, list[LayerDelta]] = {}
    dense_keys, not_applied = [], []
    for key, patches in finetuned.patches.items():
        base_patches = base.patches.get(key, [])
        if patches[: len(base_patches)] != base_patches:
            raise GuidanceInputError(
                f"The fine-tuned MODEL is a copy of the base with different patches on {key}: "
                "connect the base MODEL that the LoRA was applied to."
            )
        extra = patches[len(base_patches):]
        if not extra:
            continue
        if not key.startswith(DIFFUSION_PREFIX):
            raise GuidanceInputError(f"The personalization patches {key}, outside the diffusion model.")
        if not host.patch_applied(finetuned.model, key):
            not_applied.append(key)  # ComfyUI never applies it: the fine-tuned model runs without it, so does the weak
            continue
        factors = [_low_rank(p) for p in extra]
        placement = place_parameter(finetuned.model, key)
        shape = getattr(finetuned.model.get_submodule(placement.path), placement.name).shape
        if all(f is not None for f in factors) and _low_rank_candidate(placement, finetuned, shape):
            low_rank[key] = factors
        else:
            dense_keys.append(key)
    if not_applied:
        log.warning("Personalization guidance: ComfyUI does not apply the LoRA's patches on %d parameter(s) that their "
                    "modules use inline (first: %s), so the fine-tuned model samples without them; the weak model "
                    "leaves them out too.", len(not_applied), not_applied[0])
    if not low_rank and not dense_keys:
        raise GuidanceInputError(
            "The fine-tuned MODEL has no patches beyond the base MODEL: there is nothing to personalize. "
            "Apply a LoRA to the base, or connect a separately loaded fine-tuned model."
        )
    dense = {}
    if dense_keys:
        stored = stored_dtype(finetuned)
        ft_weights = finetuned.get_key_patches(DIFFUSION_PREFIX)
        for key in dense_keys:
            (weight, convert), *patches = ft_weights[key]
            base_patches = base.patches.get(key, [])
            d = tensor_delta(key, _effective(weight, convert, base_patches, key),
                             _effective(weight, convert, patches, key), stored)
            if d is not None:
                dense[key] = d
        log.info(
            "Personalization guidance: %d of %d patched tensors are not plain LoRA on a Linear or Conv weight (LoHa, "
            "LoKr, DoRA, a .diff, ...) and use an exact dense delta instead of the batched low-rank route.",
            len(dense_keys), len(dense_keys) + len(low_rank),
        )
    placements = _placements(finetuned, (*dense, *low_rank))
    _check_structure(placements)
    return FinetunedPair(
        finetuned=finetuned,
        deltas=_collect(finetuned, dense, low_rank),
        placements=placements,
        dense_fallbacks=len(dense_keys),
    )


def load_lora_pair(
    base_model: comfy.model_patcher.ModelPatcher, base_clip, lora_sd: dict[str, torch.Tensor], strength: float, name: str
):
    """Apply a LoRA file to the base MODEL and CLIP at ``strength``; return (pair, fine-tuned CLIP).

    Unlike ``comfy.sd.load_lora_for_models`` this counts what matched: a LoRA that
    matches nothing is an error, one that matches in part a warning with counts.
    ``base_clip`` may be None (a diffusion-model file has no CLIP).
    """
    check_finite(lora_sd, f"The LoRA {name}")
    key_map = comfy.lora.model_lora_keys_unet(base_model.model, {})
    if base_clip is not None:
        key_map = comfy.lora.model_lora_keys_clip(base_clip.cond_stage_model, key_map)
    lora_sd = comfy.lora_convert.convert_lora(lora_sd)
    loaded = comfy.lora.load_lora(lora_sd, key_map, log_missing=False)
    used = set()
    for patch in loaded.values():
        used |= set(getattr(patch, "loaded_keys", ()))
    unet_patches = {k: v for k, v in loaded.items() if (k[0] if isinstance(k, tuple) else k).startswith(DIFFUSION_PREFIX)}
    if not unet_patches:
        raise GuidanceInputError(
            f"The LoRA {name} matches no layer of the base model's diffusion model: "
            "it was trained for another architecture, or is not a LoRA."
        )
    unused = sorted(set(lora_sd) - used)
    if unused:
        log.warning(
            "Personalization guidance: the LoRA %s matched %d of %d tensors of the base model; %d were not loaded "
            "(first: %s).", name, len(lora_sd) - len(unused), len(lora_sd), len(unused), ", ".join(unused[:5]),
        )
    finetuned = base_model.clone()
    finetuned.add_patches(unet_patches, strength)
    ft_clip = None
    if base_clip is not None:
        ft_clip = base_clip.clone()
        ft_clip.add_patches(loaded, strength)
    return _pair_from_clone(base_model, finetuned), ft_clip
