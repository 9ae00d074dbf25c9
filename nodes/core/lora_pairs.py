"""A pair from the base with a LoRA or another adapter applied: the adapter's patches are the delta.

Plain LoRA patches on Linear and Conv weights stay low-rank and are applied row by row;
every other patch ComfyUI's LoRA loaders make (LoHa, LoKr, DoRA, OFT, BOFT, GLoRA, LoCon with
a mid weight, a ``.diff``) becomes an exact dense delta, formed one tensor at a time from the
weights as ComfyUI computes them with and without the adapter.
"""

from __future__ import annotations

import logging
import math

import comfy.lora
import comfy.lora_convert
import comfy.model_patcher
import comfy.weight_adapter
import torch

from ...guidance import GuidanceInputError, LayerDelta, LowRankDelta, check_finite, place_parameter, tensor_delta
from . import host
from .pairs import (
    DIFFUSION_PREFIX,
    FinetunedPair,
    check_memory,
    collect,
    effective,
    log_routes,
    low_rank_candidate,
    placements_of,
    split_key,
    stored_dtype,
)

log = logging.getLogger(__name__)


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



# Text-feature widths of the cross-attention layers of UNet families: where a LoRA's shapes tell its model.
_TEXT_WIDTHS = {768: "SD1.5", 1024: "SD2.x", 1280: "SDXL's refiner", 2048: "SDXL"}
# Adapters whose change is not linear in their strength as ComfyUI applies them (W + s^2 (R - I) W for OFT; a
# polynomial of higher degree for BOFT with several butterfly factors).
_NOT_LINEAR = ("oft", "boft")


def pair_from_clone(base: comfy.model_patcher.ModelPatcher, finetuned: comfy.model_patcher.ModelPatcher,
                    what: str = "The LoRA on the fine-tuned MODEL") -> FinetunedPair:
    """The fine-tuned MODEL is the base with extra patches (a LoRA or another adapter): those patches are the delta.

    Plain LoRA patches stay low-rank and are applied row by row; any other patch (LoHa, LoKr, DoRA, OFT, BOFT,
    GLoRA, LoCon with a mid weight, a ``.diff``) becomes an exact dense delta, formed one tensor at a time from the
    weight as ComfyUI computes it with and without the patches. ``what`` names the personalization in refusals.
    """
    _refuse_bypass(base, finetuned)
    extra = _extra_patches(base, finetuned)
    _check_fits(finetuned, extra, what)
    low_rank: dict[str, list[LayerDelta]] = {}
    dense_keys = []
    for key, patches in extra.items():
        factors = [_low_rank(p) for p in patches]
        placement = place_parameter(finetuned.model, key)
        shape = host.true_shape(getattr(finetuned.model.get_submodule(placement.path), placement.name))
        if all(f is not None for f in factors) and low_rank_candidate(placement, finetuned, shape):
            if any(f.scale != 0.0 for f in factors):  # strength 0: no change
                low_rank[key] = factors
        else:
            dense_keys.append(key)
    _log_not_linear(extra)
    dense, lazy = _dense_deltas(base, finetuned, dense_keys, what) if dense_keys else ({}, set())
    if not low_rank and not dense and not lazy:
        raise GuidanceInputError(
            f"{what} changes no weight of the base: all {len(extra)} of its patched tensors come out unchanged once "
            "ComfyUI applies the patches, so guidance would be plain CFG. Check that the file is a trained "
            "personalization (not an untrained or empty one) and that its strength is not 0."
        )
    if dense_keys:
        log.info(
            "Personalization guidance: %d of %d patched tensors are not plain LoRA on a Linear or Conv weight (LoHa, "
            "LoKr, DoRA, OFT, a .diff, ...) and use an exact dense delta instead of the batched low-rank route "
            "(%d of them GGUF weights read as their layer runs, %d unchanged by their patch).", len(dense_keys),
            len(dense_keys) + len(low_rank), len(lazy),
            len(dense_keys) - len(dense) - len(lazy),
        )
    placements = placements_of(finetuned, (*dense, *low_rank, *lazy))
    log_routes(placements)
    return FinetunedPair(
        finetuned=finetuned,
        deltas=collect(finetuned, dense, low_rank, lazy, base),
        placements=placements,
        dense_fallbacks=len(dense_keys),
    )


def _refuse_bypass(base: comfy.model_patcher.ModelPatcher, finetuned: comfy.model_patcher.ModelPatcher) -> None:
    if host.bypass_injections(finetuned) is not None and host.bypass_injections(base) is None:
        raise GuidanceInputError(
            "The fine-tuned MODEL carries its LoRA in bypass mode (Load LoRA (Bypass)), which adds the LoRA's output "
            "in the forward instead of patching weights: there is no weight delta to read. Load the personalization "
            "LoRA with Load LoRA (model only) or the pair loaders; LoRAs in bypass mode on top of the fine-tuned "
            "MODEL are fine."
        )


def _extra_patches(base: comfy.model_patcher.ModelPatcher, finetuned: comfy.model_patcher.ModelPatcher) -> dict:
    """The patches the fine-tuned MODEL has beyond the base's, per key, that ComfyUI applies when it loads."""
    extra, not_applied = {}, []
    for key, patches in finetuned.patches.items():
        base_patches = base.patches.get(key, [])
        if patches[: len(base_patches)] != base_patches:
            raise GuidanceInputError(
                f"The fine-tuned MODEL is a copy of the base with different patches on {key}: "
                "connect the base MODEL that the LoRA was applied to."
            )
        if len(patches) == len(base_patches):
            continue
        if not key.startswith(DIFFUSION_PREFIX):
            raise GuidanceInputError(f"The personalization patches {key}, outside the diffusion model.")
        if not host.patch_applied(finetuned.model, key):
            not_applied.append(key)  # ComfyUI never applies it: the fine-tuned model runs without it, so does the weak
            continue
        extra[key] = patches[len(base_patches):]
    if not_applied:
        log.warning("Personalization guidance: ComfyUI does not apply the LoRA's patches on %d parameter(s) that their "
                    "modules use inline (first: %s), so the fine-tuned model samples without them; the weak model "
                    "leaves them out too.", len(not_applied), not_applied[0])
    if not extra:
        raise GuidanceInputError(
            "The fine-tuned MODEL has no patches beyond the base MODEL: there is nothing to personalize. "
            "Apply a LoRA to the base, or connect a separately loaded fine-tuned model."
        )
    return extra


def _patch_shape(patch) -> tuple[torch.Size, torch.Size] | None:
    """(the weight shape a LoRA or diff patch was made for, as far as it tells: rows and input size, or the whole
    shape), or None for adapters whose fit ComfyUI checks itself when it applies them."""
    adapter = patch[1]
    if isinstance(adapter, comfy.weight_adapter.LoRAAdapter):
        up, down, _alpha, mid, _dora, reshape = adapter.weights
        if mid is not None or reshape is not None:
            return None
        return up.shape[0], down.numel() // down.shape[0]
    if host.adapter_name(patch) == "diff" and isinstance(adapter, tuple) and isinstance(adapter[-1], tuple):
        diff = adapter[-1][0]
        return tuple(diff.shape)
    return None


def _check_fits(finetuned: comfy.model_patcher.ModelPatcher, extra: dict, what: str) -> None:
    """Refuse, in the user's terms, a personalization made for another model (its shapes do not fit the base)."""
    mismatches = []
    for key, patches in extra.items():
        placement = place_parameter(finetuned.model, key)
        shape = tuple(host.true_shape(getattr(finetuned.model.get_submodule(placement.path), placement.name)))
        for patch in patches:
            made_for = _patch_shape(patch)
            fits = made_for is None or made_for in (shape, (shape[0], math.prod(shape[1:])))
            if not fits:
                mismatches.append((key, made_for, shape))
    if not mismatches:
        return
    cross = [m for m in mismatches if ".attn2.to_k." in m[0] or ".attn2.to_v." in m[0]]
    key, made_for, shape = (cross or mismatches)[0]
    which = ""
    if cross and len(made_for) == 2:
        theirs, ours = _TEXT_WIDTHS.get(made_for[1]), _TEXT_WIDTHS.get(shape[1])
        if theirs and ours:
            which = f" ({theirs}: its cross-attention takes {made_for[1]}-wide text features; this base is {ours}, {shape[1]})"
    raise GuidanceInputError(
        f"{what} was made for another model than this base{which}: {len(mismatches)} of its patched tensors do not "
        f"fit. Choose a file trained on this base. First: {key} expects {made_for}, the base has {shape}."
    )


def _log_not_linear(extra: dict) -> None:
    """Say what the weak model is for adapters that are not linear in their strength (docs/design.md, Conventions)."""
    kinds = sorted({host.adapter_name(p) for ps in extra.values() for p in ps} & set(_NOT_LINEAR))
    if kinds:
        log.info("Personalization guidance: the personalization holds %s adapters, which ComfyUI applies "
                 "non-linearly in the strength s (OFT: W + s^2 (R - I) W): the weak model is the weight interpolation "
                 "theta_pre + omega * delta (for OFT, the adapter at strength s * sqrt(omega)), not the adapter at "
                 "omega * s.", "/".join(k.upper() for k in kinds))


def _dense_deltas(base: comfy.model_patcher.ModelPatcher, finetuned: comfy.model_patcher.ModelPatcher,
                  keys: list[str], what: str) -> tuple[dict[str, torch.Tensor], set[str]]:
    """The exact deltas of patches that are not plain LoRA, one tensor at a time, after a memory check; and the keys
    of packed GGUF weights among them, which keep no delta but are read as their layer runs (``pairs.LazyDelta``).
    A patch ComfyUI fails to apply (it logs and leaves the weight as it was) is refused with ComfyUI's message."""
    stored = stored_dtype(finetuned)
    size = torch.empty((), dtype=stored).element_size()
    entries = host.key_entries(finetuned, DIFFUSION_PREFIX)
    layer = {key for key in keys if (p := place_parameter(finetuned.model, key)).kind is not None and not p.reason}
    paths = {split_key(key)[0] for key in layer if host.is_gguf_packed(entries[key][0][0])}
    packed = {key for key in layer if split_key(key)[0] in paths}  # packed GGUF layers: every changed parameter
    numels = {key: math.prod(host.true_shape(entries[key][0][0])) for key in keys}
    check_memory(sum(n for key, n in numels.items() if key not in packed) * size, 4 * 3 * max(numels.values()),
                 f"the dense delta of {what}", advice=", or use a plain LoRA (which needs no dense delta)")
    dense, lazy = {}, set()
    for key in keys:
        (weight, convert), *patches = entries[key]
        base_patches = base.patches.get(key, [])
        with host.patch_problems() as problems:
            d = tensor_delta(key, effective(finetuned, key, weight, convert, base_patches),
                             effective(finetuned, key, weight, convert, patches), stored)
        if problems:
            raise GuidanceInputError(
                f"ComfyUI could not apply {what} to {key}, so the fine-tuned model would sample without it: "
                f"{problems[0]}. The file may be damaged or made for another model or ComfyUI version."
            )
        if d is None:
            continue
        if key in packed:
            lazy.add(key)
        else:
            dense[key] = d
    return dense, lazy


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
    with host.lora_keys_not_loaded() as unused:
        loaded = comfy.lora.load_lora(lora_sd, key_map, log_missing=True)
    unet_patches = {k: v for k, v in loaded.items() if (k[0] if isinstance(k, tuple) else k).startswith(DIFFUSION_PREFIX)}
    if not unet_patches:
        raise GuidanceInputError(
            f"The LoRA {name} matches no layer of the base model's diffusion model: "
            "it was trained for another architecture, or is not a LoRA."
        )
    unused = sorted(unused)
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
    return pair_from_clone(base_model, finetuned, what=f"The LoRA {name}"), ft_clip
