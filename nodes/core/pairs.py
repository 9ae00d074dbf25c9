"""A base model and its personalization, as ComfyUI objects, and the weight delta between them."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

import comfy.lora
import comfy.lora_convert
import comfy.model_patcher
import comfy.weight_adapter

from ...guidance import (
    DenseDelta,
    GuidanceInputError,
    LayerDelta,
    LowRankDelta,
    check_finite,
    check_layer,
    check_same_architecture,
    weight_delta,
)

log = logging.getLogger(__name__)

DIFFUSION_PREFIX = "diffusion_model."


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
                for field_name in ("weight", "bias", "up", "down"):
                    tensor = getattr(delta, field_name, None)
                    if tensor is not None:
                        param = torch.nn.Parameter(tensor, requires_grad=False)
                        self.register_parameter(f"delta_{index}", param)
                        setattr(delta, field_name, param)
                        index += 1


@dataclass
class FinetunedPair:
    """The fine-tuned MODEL and delta = theta_ft - theta_pre per layer of its diffusion model.

    ``deltas`` maps a layer's path in the BaseModel (``diffusion_model.…``) to the
    deltas that act on it: low-rank LoRA factors where they can be applied row by
    row, dense tensors otherwise.
    """

    finetuned: comfy.model_patcher.ModelPatcher
    deltas: dict[str, list[LayerDelta]]
    dense_fallbacks: int = 0
    delta_patcher: comfy.model_patcher.ModelPatcher = field(init=False, repr=False)
    # Room for weak parameters, made by the runtime on first use where the pair samples on its split route.
    workspace: comfy.model_patcher.ModelPatcher | None = field(default=None, init=False, repr=False)

    def __post_init__(self):
        self.delta_patcher = comfy.model_patcher.ModelPatcher(
            DeltaWeights(self.deltas), load_device=self.finetuned.load_device, offload_device=self.finetuned.offload_device
        )

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


def _effective_weights(model: comfy.model_patcher.ModelPatcher, keys, patches_of) -> dict[str, torch.Tensor]:
    """fp32 weights of ``keys`` with the given patches applied, read from the unpatched originals."""
    originals = model.get_key_patches(DIFFUSION_PREFIX)
    out = {}
    for key in keys:
        weight, convert = originals[key][0]
        weight = convert(weight.detach().to("cpu", torch.float32, copy=True), inplace=True)
        patches = patches_of(key)
        out[key] = comfy.lora.calculate_weight(patches, weight, key) if patches else weight
    return out


def _collect(model: comfy.model_patcher.ModelPatcher, dense: dict[str, torch.Tensor], low_rank) -> dict[str, list[LayerDelta]]:
    """Group per-tensor deltas by layer and check that each layer can take them."""
    layers: dict[str, list[LayerDelta]] = {}
    for key, d in dense.items():
        layer, param = _split_key(key)
        if param not in ("weight", "bias"):
            raise GuidanceInputError(f"The personalization changes {key}, which is not a layer's weight or bias.")
        group = layers.setdefault(layer, [])
        dense_delta = next((x for x in group if isinstance(x, DenseDelta)), None)
        if dense_delta is None:
            dense_delta = DenseDelta()
            group.append(dense_delta)
        setattr(dense_delta, param, _stored(d, model))
    for key, deltas in low_rank.items():
        layers.setdefault(_split_key(key)[0], []).extend(deltas)
    for layer, deltas in layers.items():
        module = model.model.get_submodule(layer)
        for d in deltas:
            check_layer(layer, module, d)
    return layers


def pair_from_models(base: comfy.model_patcher.ModelPatcher, finetuned: comfy.model_patcher.ModelPatcher) -> FinetunedPair:
    """Form the pair from two MODELs: a clone with extra (LoRA) patches, or two separate models."""
    if finetuned.is_clone(base):
        return _pair_from_clone(base, finetuned)
    base_shapes = {k: v.shape for k, v in base.model_state_dict(DIFFUSION_PREFIX).items()}
    ft_shapes = {k: v.shape for k, v in finetuned.model_state_dict(DIFFUSION_PREFIX).items()}
    check_same_architecture(base_shapes, ft_shapes)  # before any weight is read
    keys = sorted(base_shapes)
    delta = weight_delta(
        _effective_weights(base, keys, lambda k: base.patches.get(k)),
        _effective_weights(finetuned, keys, lambda k: finetuned.patches.get(k)),
    )
    dense = {DIFFUSION_PREFIX + k: d for k, d in delta.items()}
    return FinetunedPair(finetuned=finetuned, deltas=_collect(finetuned, dense, {}))


def _stored(delta: torch.Tensor, model: comfy.model_patcher.ModelPatcher) -> torch.Tensor:
    """A delta formed in fp32, kept in the fine-tuned model's dtype when that is fp16 or bf16 (half the memory);
    fp32 otherwise (fp32 models, and fp8 models, whose deltas fp8 would not hold)."""
    dtype = model.model_dtype()
    return delta.to(dtype) if dtype in (torch.float16, torch.bfloat16) else delta


def _pair_from_clone(base: comfy.model_patcher.ModelPatcher, finetuned: comfy.model_patcher.ModelPatcher) -> FinetunedPair:
    """The fine-tuned MODEL is the base with extra patches (a LoRA): those patches are the delta.

    Plain LoRA patches stay low-rank and are applied row by row; any other patch
    (LoHa, LoKr, DoRA, LoCon with a mid weight, …) becomes an exact dense delta.
    """
    low_rank: dict[str, list[LayerDelta]] = {}
    dense_keys = []
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
        factors = [_low_rank(p) for p in extra]
        if all(f is not None for f in factors):
            low_rank[key] = factors
        else:
            dense_keys.append(key)
    if not low_rank and not dense_keys:
        raise GuidanceInputError(
            "The fine-tuned MODEL has no patches beyond the base MODEL: there is nothing to personalize. "
            "Apply a LoRA to the base, or connect a separately loaded fine-tuned model."
        )
    dense = {}
    if dense_keys:
        ft = _effective_weights(finetuned, dense_keys, lambda k: finetuned.patches[k])
        pre = _effective_weights(base, dense_keys, lambda k: base.patches.get(k))
        dense = {k: ft[k] - pre[k] for k in dense_keys}
        check_finite(dense, "The LoRA's weight delta")
        log.info(
            "Personalization guidance: %d of %d patched tensors are not plain LoRA (LoHa, LoKr, DoRA, ...) and use an "
            "exact dense delta instead of the batched low-rank route.",
            len(dense_keys), len(dense_keys) + len(low_rank),
        )
    return FinetunedPair(
        finetuned=finetuned,
        deltas=_collect(finetuned, dense, low_rank),
        dense_fallbacks=len(dense_keys),
    )


def load_lora_pair(
    base_model: comfy.model_patcher.ModelPatcher, base_clip, lora_sd: dict[str, torch.Tensor], strength: float, name: str
):
    """Apply a LoRA file to the base MODEL and CLIP at ``strength``; return (pair, fine-tuned CLIP).

    Unlike ``comfy.sd.load_lora_for_models`` this counts what matched: a LoRA that
    matches nothing is an error, one that matches in part a warning with counts.
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
