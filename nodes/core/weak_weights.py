"""Weak-weight memory planning: whether a full pair's weak rows run with weak weights, and where those weights live.

A full fine-tune changes most of the model. Correcting each layer's output for the weak
rows would pass them through every layer twice, so each changed layer that computes with
its own parameters runs its weak rows with weak parameters theta_ft + (omega - 1) delta
instead (``handlers.WeakWeights``). Those are formed either

- once per omega, in a *workspace* that ComfyUI loads with the model as an additional
  model, where omega takes one value over the run and the device (not the system memory
  that holds the delta) has room for a second weight set next to the model; or
- just in time, layer by layer, in a scratch buffer the size of the largest layer.

Two weight sets either way (docs/design.md, "Memory and cost"): theta_ft and theta_w on
the device with the delta in system memory, or theta_ft and the delta.
"""

from __future__ import annotations

import comfy.model_management
import comfy.model_patcher
import torch

from ...guidance import DenseDelta, LayerDelta, LowRankDelta, weak_parameter
from . import host
from .pairs import FinetunedPair, LazyDelta


class WeakWorkspace(torch.nn.Module):
    """Room for the weak parameters of the layers that run their weak rows with weak weights.

    Like the pair's DeltaWeights, a module of frozen parameters that ComfyUI loads,
    as an additional model, with the fine-tuned model and within its memory budget.
    ``layers`` maps a layer path to its parameter names and the tensors they get.
    """

    def __init__(self, shapes: dict[str, dict[str, torch.Tensor]], device: torch.device):
        super().__init__()
        # What the slots hold weak parameters for: (omega - 1, the loaded weights' patches uuid, the layers formed and
        # their block factors).
        self.formed_for: tuple | None = None
        self.layers: dict[str, dict[str, torch.nn.Parameter]] = {}
        for path, params in shapes.items():
            slots = {}
            for name, like in params.items():
                slot = torch.nn.Parameter(torch.empty(like.shape, dtype=like.dtype, device=device), requires_grad=False)
                self.register_parameter(f"weak_{len(self._parameters)}", slot)
                slots[name] = slot
            self.layers[path] = slots

    def nbytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.parameters())

    @torch.no_grad()
    def form(self, users: list, coefficient: float, root: torch.nn.Module) -> None:
        """The weak parameters of ``users`` (``handlers.WeakWeights`` with slots here) for ``coefficient`` = omega - 1,
        each scaled by its layer's block factor, unless the slots already hold them: same omega, same loaded weights,
        same layers and factors (e.g. the next run with a constant omega)."""
        loaded = getattr(root, "current_weight_patches_uuid", None)
        patcher = getattr(root, "current_patcher", None)
        if patcher is not None and patcher.hook_patches:
            loaded = None  # hooks on the conditioning may patch weights during the run: form every time
        key = (coefficient, loaded, tuple((h.path, h.factor) for h in users))
        if loaded is not None and self.formed_for == key:
            return
        self.formed_for = None  # an interrupted forming leaves nothing to trust
        for handler in users:
            for name, slot in handler.slots.items():
                weak_parameter(handler.module._parameters[name], handler.delta.params[name], handler.scaled(coefficient),
                               out=slot.data)
        self.formed_for = key


def single_dense(deltas: list[LayerDelta]) -> DenseDelta | None:
    """The module's delta when it is one dense delta, else None."""
    return deltas[0] if len(deltas) == 1 and isinstance(deltas[0], DenseDelta) and deltas[0].tensors() else None


def parameter_names(deltas: list) -> list[str]:
    """The parameters a module's deltas change (LoRA factors change its weight)."""
    names = ["weight"] if any(isinstance(d, LowRankDelta) for d in deltas) else []
    names += [n for d in deltas if isinstance(d, DenseDelta) for n in d.params]
    return list(dict.fromkeys(names + [n for d in deltas if isinstance(d, LazyDelta) for n in d.names]))


def plain_layer_delta(pair: FinetunedPair, path: str, deltas: list[LayerDelta]) -> DenseDelta | None:
    """A dense delta on a layer kind's own parameters: weak weights can take it."""
    dense = single_dense(deltas)
    if dense is None:
        return None
    places = [pair.placements[f"{path}.{name}"] for name in dense.params]
    return dense if all(p.kind is not None and not p.reason for p in places) else None


def mostly_not_own(pair: FinetunedPair, root: torch.nn.Module) -> bool:
    """True when most of a full pair's dense delta sits on comfy.ops layers that do not compute with their own
    parameters as they are (``host.computes_with_own_parameters``)."""
    own = other = 0
    for path, deltas in pair.deltas.items():
        dense = plain_layer_delta(pair, path, deltas)
        if dense is None:
            continue
        module, size = root.get_submodule(path), sum(t.numel() for t in dense.tensors())
        if host.casts_through_comfy(module) and not host.computes_with_own_parameters(module):
            other += size
        else:
            own += size
    return other > own


# Weak weights pay when the dense deltas cover at least this fraction of the diffusion model's parameters.
SPLIT_FRACTION = 0.5


def prefers_weak_weights(model: comfy.model_patcher.ModelPatcher, pair: FinetunedPair) -> bool:
    """True when weak weights are the cheaper way for this pair (a full fine-tune): see the module docstring."""
    dense = sum(t.numel() for path, deltas in pair.deltas.items()
                if (d := plain_layer_delta(pair, path, deltas)) is not None for t in d.tensors())
    return dense >= SPLIT_FRACTION * sum(p.numel() for p in model.model.diffusion_model.parameters())


def workspace_fits(model: comfy.model_patcher.ModelPatcher, nbytes: int) -> bool:
    """Weak weights formed once take a second weight set on the device. Only where the device is not the system
    memory that also holds the delta (two weight sets), ComfyUI holds weights as they are (not streamed, not cast
    from another dtype), and the model with the workspace fits in the device's memory."""
    device = model.load_device
    if device.type == "cpu" or host.is_dynamic(model) or getattr(model.model, "manual_cast_dtype", None) is not None:
        return False
    total = comfy.model_management.get_total_memory(device)
    return model.model_size() + nbytes + comfy.model_management.minimum_inference_memory() < total


def workspace_for(model: comfy.model_patcher.ModelPatcher, pair: FinetunedPair) -> comfy.model_patcher.ModelPatcher | None:
    """The pair's workspace for weak weights formed once, or None where it does not pay (``workspace_fits``).
    Made on first use and shared by every guider of the pair (a sweep makes many; ComfyUI runs one sampling at a
    time), so that it is allocated and loaded once."""
    if pair.workspace is None:
        shapes = {}
        for path, deltas in pair.deltas.items():
            dense = plain_layer_delta(pair, path, deltas)
            if dense is not None:
                layer = model.model.get_submodule(path)
                shapes[path] = {name: layer._parameters[name] for name in dense.params}
        nbytes = sum(t.numel() * t.element_size() for params in shapes.values() for t in params.values())
        if not workspace_fits(model, nbytes):
            return None
        pair.workspace = comfy.model_patcher.ModelPatcher(WeakWorkspace(shapes, model.offload_device),
                                                          load_device=model.load_device, offload_device=model.offload_device)
    return pair.workspace

