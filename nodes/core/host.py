"""What this pack asks of the ComfyUI it runs in, answered in one place.

ComfyUI changed how it holds weights between v0.8.0 and 0.33 (dynamic VRAM, bypass
LoRA, quantized tensors, MultiGPU clones). The runtime and pair formation ask the
questions below instead of probing ComfyUI's objects themselves, so that a new
ComfyUI release changes this module only.

How a comfy.ops layer gets the weight it computes with, by ComfyUI's source:

- resident (v0.8.0 and 0.33, full loads): ``module.weight`` is the patched weight and
  the layer's forward uses it as it is;
- cast (low-VRAM partial loads, and models stored in another dtype than they compute
  in, such as fp8): each forward casts ``module.weight`` to the input's device and
  dtype (``comfy.ops.cast_bias_weight``), then applies ``weight_function`` (LoRA
  patches applied on the fly);
- dynamic VRAM (0.33 on NVIDIA GPUs): the weight streams from a buffer of its own
  (``module._v``) and LoRA patches sit in ``weight_lowvram_function``;
  ``module.weight`` is the unpatched base tensor, which the layer does not read;
- bypass LoRA (0.33): ``module.forward`` is replaced by one that adds the LoRA's output.

In every case ``weight_function`` runs last on whatever weight ``cast_bias_weight``
delivers, and forward hooks fire around the layer's call.
"""

from __future__ import annotations

import comfy.model_patcher
import comfy.ops
import torch

try:  # ComfyUI 0.33: fp8 / fp4 / int8 layouts from comfy-kitchen
    from comfy.quant_ops import QuantizedTensor
except ImportError:  # v0.8.0
    QuantizedTensor = None

# The injections key under which ComfyUI 0.33's "Load LoRA (Bypass)" keeps its adapters.
BYPASS_KEY = "bypass_lora"
# The additional-models key under which ComfyUI 0.33's MultiGPU node keeps the per-device copies.
MULTIGPU_KEY = "multigpu"


def is_quantized(tensor) -> bool:
    """True for ComfyUI's packed quantized tensors (not plain fp8 dtypes, which torch converts itself)."""
    return QuantizedTensor is not None and isinstance(tensor, QuantizedTensor)


def float_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor's values as a plain tensor: quantized layouts dequantized, others as they are."""
    return tensor.dequantize() if is_quantized(tensor) else tensor


def float_dtype(tensor: torch.Tensor) -> torch.dtype:
    """The dtype a tensor's values take as a plain tensor (a quantized tensor's original dtype)."""
    if is_quantized(tensor):
        return tensor.params.orig_dtype
    return tensor.dtype


def is_dynamic(patcher: comfy.model_patcher.ModelPatcher) -> bool:
    """True when ComfyUI streams this model's weights (dynamic VRAM, 0.33 and newer)."""
    return bool(getattr(patcher, "is_dynamic", lambda: False)())


def uses_multiple_gpus(patcher: comfy.model_patcher.ModelPatcher) -> bool:
    """True when ComfyUI will run some conds on copies of the model on other GPUs (0.33's MultiGPU node)."""
    return bool(patcher.get_additional_models_with_key(MULTIGPU_KEY))


def bypass_injections(patcher: comfy.model_patcher.ModelPatcher):
    """The bypass-LoRA injections of a MODEL (0.33's "Load LoRA (Bypass)"), or None."""
    get = getattr(patcher, "get_injections", None)
    return None if get is None else get(BYPASS_KEY)


def casts_through_comfy(layer: torch.nn.Module) -> bool:
    """True for comfy.ops layers: their weights go through ``cast_bias_weight`` and its ``weight_function``."""
    return isinstance(layer, comfy.ops.CastWeightBiasOp)


def computes_with_own_parameters(layer: torch.nn.Module) -> bool:
    """True when the layer computes with ``layer._parameters`` as they are, perhaps cast to the input's dtype and
    device: so that putting other tensors there for some rows gives those rows other weights, exactly.

    Not so when ComfyUI patches its weights on the fly (``weight_function``), streams them (dynamic VRAM), or
    packs them (quantized), nor when something replaced the layer's forward (bypass LoRA).
    """
    if "forward" in layer.__dict__ or hasattr(layer, "_v"):
        return False
    for name in ("weight", "bias"):
        if getattr(layer, f"{name}_function", None) or getattr(layer, f"{name}_lowvram_function", None):
            return False
    return not any(is_quantized(p) for p in layer._parameters.values() if p is not None)


def casts_weights(layer: torch.nn.Module) -> bool:
    """True when each forward casts the layer's stored weights to the input's dtype and device."""
    return bool(getattr(layer, "comfy_cast_weights", False))


def with_weight_functions(layer: torch.nn.Module, functions: dict[str, list]) -> dict[str, object]:
    """Set ``<name>_function`` lists on a comfy.ops layer; returns what to give ``restore_attributes``.

    The class default is one shared list: never append to it, always assign a new list.
    """
    saved = {}
    for name, extra in functions.items():
        attribute = f"{name}_function"
        saved[attribute] = layer.__dict__.get(attribute, _ABSENT)
        setattr(layer, attribute, [*getattr(layer, attribute), *extra])
    return saved


_ABSENT = object()


def restore_attributes(layer: torch.nn.Module, saved: dict[str, object]) -> None:
    for attribute, value in saved.items():
        if value is _ABSENT:
            layer.__dict__.pop(attribute, None)
        else:
            setattr(layer, attribute, value)


def patch_applied(root: torch.nn.Module, key: str) -> bool:
    """True when ComfyUI's model loading applies weight patches (a LoRA's) to the parameter ``key``.

    ComfyUI (v0.8.0 and 0.33) loads and patches module by module, and skips the own
    parameters of a module whose children hold parameters too (``ModelPatcher._load_list``):
    a patch on such a parameter (Wan's ``modulation``, Z-Image's pad tokens) never
    reaches the model.
    """
    path = key.rpartition(".")[0]
    module = root.get_submodule(path)
    own = {id(p) for p in module.parameters(recurse=False)}
    return all(id(p) in own for p in module.parameters(recurse=True))
