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
- GGUF (the ComfyUI-GGUF custom nodes, recognised by what their objects carry, never
  imported): a quantized weight is a ``GGMLTensor`` of packed bytes with the true
  ``tensor_shape``; its layer dequantizes it in ``get_weight`` in every forward and applies
  the patches that ComfyUI-GGUF attached to the tensor at load (``tensor.patches``). Such a
  layer ignores ``weight_function``, and its model's ``state_dict()`` is a stand-in for
  memory estimates (raw byte shapes and an extra ``temp.weight`` key): names, shapes and
  values are read from the modules and through ``get_weight`` instead (``model_tensors``,
  ``key_entries``, ``gguf_weight``).

In every case but packed GGUF layers ``weight_function`` runs last on whatever weight
``cast_bias_weight`` delivers, and forward hooks fire around the layer's call (GGUF
layers included).
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager

import comfy.lora
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
    """The dtype a tensor's values take as a plain tensor (a quantized tensor's original dtype; for packed GGUF data,
    the dtype ComfyUI-GGUF dequantizes in: bf16 for BF16, else fp16)."""
    if is_quantized(tensor):
        return tensor.params.orig_dtype
    if is_gguf_packed(tensor):
        return torch.bfloat16 if getattr(tensor.tensor_type, "name", "") == "BF16" else torch.float16
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
    return not any(is_quantized(p) or is_gguf(p) for p in layer._parameters.values() if p is not None)


def honours_weight_function(layer: torch.nn.Module) -> bool:
    """True when ComfyUI applies the layer's ``weight_function`` to the weight it computes with: comfy.ops layers,
    except GGUF layers whose weights are packed (they dequantize and patch in ``get_weight`` instead)."""
    return casts_through_comfy(layer) and not reads_weights_in_call_only(layer)


def casts_weights(layer: torch.nn.Module) -> bool:
    """True when each forward casts the layer's stored weights to the input's dtype and device."""
    return bool(getattr(layer, "comfy_cast_weights", False))


def with_weight_functions(layer: torch.nn.Module, functions: dict[str, list]) -> dict[str, object]:
    """Set ``<name>_function`` lists on a comfy.ops layer; returns what to give ``restore_attributes``. A function
    with a true ``pass_through`` attribute returns the weight unchanged (``computed_weight`` disregards it).

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


# Where ComfyUI reports a weight patch it could not apply: it logs, and leaves the weight without the patch.
_PATCH_SOURCES = (os.path.join("comfy", "lora.py"), os.path.join("comfy", "weight_adapter") + os.sep)


class _PatchProblems(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if any(source in record.pathname for source in _PATCH_SOURCES):
            self.messages.append(record.getMessage())


@contextmanager
def patch_problems():
    """Collects what ComfyUI logs (warnings and errors) while it applies weight patches inside the block: a patch it
    could not apply (an adapter's error, a shape mismatch, an unknown patch type) is logged, not raised, and the
    weight is left without it. Yields the list of messages."""
    collector = _PatchProblems()
    root = logging.getLogger()
    root.addHandler(collector)
    try:
        yield collector.messages
    finally:
        root.removeHandler(collector)


def adapter_name(patch) -> str:
    """The kind of a weight patch as ComfyUI names it ("lora", "loha", "lokr", "oft", "boft", "glora", "diff", ...)."""
    adapter = patch[1]
    name = getattr(adapter, "name", None)
    if name:
        return name
    if isinstance(adapter, tuple) and len(adapter) == 2 and isinstance(adapter[0], str):
        return adapter[0]
    return "diff"


_NOT_LOADED = "lora key not loaded: "


@contextmanager
def lora_keys_not_loaded():
    """The keys of a LoRA file that ``comfy.lora.load_lora(..., log_missing=True)`` did not load, as ComfyUI itself
    decides and reports them (one warning per key, kept out of the log here: the caller reports them once)."""
    found: list[str] = []

    def keep(record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if record.pathname.endswith(_PATCH_SOURCES[0]) and message.startswith(_NOT_LOADED):
            found.append(message[len(_NOT_LOADED):])
            return False
        return True

    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield found
    finally:
        root.removeFilter(keep)


# ---------------------------------------------------------------------------------------------- GGUF (ComfyUI-GGUF)
# GGML types whose data ComfyUI-GGUF keeps as torch values (F32 and F16); every other type is packed bytes.
_GGUF_TORCH_VALUED = (0, 1)


def is_gguf(tensor) -> bool:
    """A ComfyUI-GGUF ``GGMLTensor``: data plus ``tensor_type`` and the true ``tensor_shape``."""
    return isinstance(tensor, torch.Tensor) and hasattr(tensor, "tensor_type") and hasattr(tensor, "tensor_shape")


def is_gguf_packed(tensor) -> bool:
    """A GGMLTensor whose data are packed blocks (BF16 and the quantized types): readable only through its layer."""
    return is_gguf(tensor) and tensor.tensor_type is not None and int(tensor.tensor_type) not in _GGUF_TORCH_VALUED


def reads_weights_in_call_only(layer: torch.nn.Module) -> bool:
    """A GGUF layer holding packed weights: it reads them in its own call only, through ``get_weight``."""
    return callable(getattr(layer, "get_weight", None)) and any(
        is_gguf_packed(p) for p in layer._parameters.values() if p is not None)


def plain(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor as a plain torch.Tensor (a GGMLTensor's clone() and detach() return itself)."""
    return tensor.as_subclass(torch.Tensor) if is_gguf(tensor) else tensor


def true_shape(tensor: torch.Tensor) -> torch.Size:
    return torch.Size(tensor.tensor_shape) if is_gguf(tensor) else tensor.shape


def has_gguf(patcher: comfy.model_patcher.ModelPatcher) -> bool:
    """True when the model holds GGUF tensors (loaded by ComfyUI-GGUF)."""
    return any(is_gguf(p) for p in patcher.model.parameters())


def gguf_weight(layer: torch.nn.Module, tensor: torch.Tensor, patches: list, key: str, dtype: torch.dtype,
                device) -> torch.Tensor:
    """A packed tensor's values as its layer computes with them under ``patches``: the layer's own ``get_weight``
    (its dequantization, then ComfyUI's ``calculate_weight``) on a view of the tensor that carries ``patches``
    instead of those attached at load, so that a base and a fine-tune sharing the tensor both read right."""
    view = tensor.as_subclass(type(tensor))
    view.tensor_type, view.tensor_shape = tensor.tensor_type, tensor.tensor_shape
    view.patches = [(patches, key)] if patches else []
    return plain(layer.get_weight(view.to(device), dtype))


def model_tensors(patcher: comfy.model_patcher.ModelPatcher, prefix: str) -> dict[str, torch.Tensor]:
    """key -> tensor of the model under ``prefix``, as ``model_state_dict`` lists them, from the modules' own
    parameters and persistent buffers (a GGUF model's state_dict() is a stand-in: see the module docstring)."""
    if not has_gguf(patcher):
        return patcher.model_state_dict(prefix)
    out = {}
    for path, module in patcher.model.named_modules():
        own = [*module._parameters.items(),
               *((n, b) for n, b in module._buffers.items() if n not in module._non_persistent_buffers_set)]
        for name, tensor in own:
            key = f"{path}.{name}" if path else name
            if tensor is not None and key.startswith(prefix):
                out[key] = tensor
    return out


def key_entries(patcher: comfy.model_patcher.ModelPatcher, prefix: str) -> dict[str, list]:
    """``ModelPatcher.get_key_patches(prefix)``: per key, [(the unpatched tensor, its convert function), *patches],
    read from the modules where the model holds GGUF tensors."""
    if not has_gguf(patcher):
        return patcher.get_key_patches(prefix)
    entries = {}
    for key in model_tensors(patcher, prefix):
        weight, _, convert = comfy.model_patcher.get_key_weight(patcher.model, key)
        if (backup := patcher.backup.get(key)) is not None:
            weight = backup.weight
        if (hook_backup := patcher.hook_backup.get(key)) is not None:
            weight = hook_backup[0]
        entries[key] = [(weight, convert or (lambda a, **kwargs: a)), *patcher.patches.get(key, [])]
    return entries


def original_value(patcher: comfy.model_patcher.ModelPatcher, key: str, dtype: torch.dtype, device) -> torch.Tensor:
    """What ``patcher``'s model computes with for ``key``, from its unpatched tensor and its patches, as a plain
    tensor in ``dtype`` on ``device``: packed GGUF through its layer, anything else as ``get_key_patches`` reads it
    (the backup where ComfyUI patched in place), dequantized, converted and patched."""
    path, _, name = key.rpartition(".")
    layer = patcher.model.get_submodule(path)
    tensor, patches = layer._parameters.get(name), patcher.patches.get(key, [])
    if tensor is not None and is_gguf_packed(tensor):
        return gguf_weight(layer, tensor, patches, key, torch.float32 if patches else dtype, device).to(dtype)
    weight, _, convert = comfy.model_patcher.get_key_weight(patcher.model, key)
    if (backup := patcher.backup.get(key)) is not None:
        weight = backup.weight
    weight = plain(float_tensor(weight.detach())).to(device, torch.float32, copy=True)
    if convert is not None:
        weight = convert(weight, inplace=True)
    return (comfy.lora.calculate_weight(patches, weight, key) if patches else weight).to(dtype)


def computed_weight(layer: torch.nn.Module, name: str, dtype: torch.dtype, device) -> torch.Tensor | None:
    """What a loaded layer computes with for its parameter ``name`` in this forward, as a plain tensor: a packed GGUF
    weight dequantized and patched by its own ``get_weight``, or a parameter the layer computes with as it is (patched
    in place by the load). None where neither holds (weights cast and patched on the fly)."""
    tensor = layer._parameters[name]
    if is_gguf_packed(tensor):
        return plain(layer.get_weight(tensor.to(device), dtype))
    functions = [f for f in getattr(layer, f"{name}_function", None) or () if not getattr(f, "pass_through", False)]
    if hasattr(layer, "_v") or functions or getattr(layer, f"{name}_lowvram_function", None) or is_quantized(tensor):
        return None
    return plain(tensor).to(device, dtype)
