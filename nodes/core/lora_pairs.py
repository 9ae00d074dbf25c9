"""A pair from the base with a LoRA or another adapter applied: the adapter's patches are the delta.

Plain LoRA patches on Linear and Conv weights stay low-rank and are applied row by row;
every other patch ComfyUI's LoRA loaders make (LoHa, LoKr, DoRA, OFT, BOFT, GLoRA, LoCon with
a mid weight, a ``.diff``) becomes an exact dense delta, formed one tensor at a time from the
weights as ComfyUI computes them with and without the adapter.
"""

from __future__ import annotations

import logging

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
    collect,
    effective,
    log_routes,
    low_rank_candidate,
    placements_of,
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



def pair_from_clone(base: comfy.model_patcher.ModelPatcher, finetuned: comfy.model_patcher.ModelPatcher) -> FinetunedPair:
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
        if all(f is not None for f in factors) and low_rank_candidate(placement, finetuned, shape):
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
            d = tensor_delta(key, effective(weight, convert, base_patches, key),
                             effective(weight, convert, patches, key), stored)
            if d is not None:
                dense[key] = d
        log.info(
            "Personalization guidance: %d of %d patched tensors are not plain LoRA on a Linear or Conv weight (LoHa, "
            "LoKr, DoRA, a .diff, ...) and use an exact dense delta instead of the batched low-rank route.",
            len(dense_keys), len(dense_keys) + len(low_rank),
        )
    placements = placements_of(finetuned, (*dense, *low_rank))
    log_routes(placements)
    return FinetunedPair(
        finetuned=finetuned,
        deltas=collect(finetuned, dense, low_rank),
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
    return pair_from_clone(base_model, finetuned), ft_clip
