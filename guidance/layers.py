"""The table of layer kinds: which modules the weak model can be applied to row by row, and how.

docs/design.md, "Routes and handlers". A *layer kind* is a module
whose output is linear in its own parameters jointly (weight and bias together):

    F(x; theta + c * delta) = F(x; theta) + c * F(x; delta)

so the rows of a batch that belong to the weak model, theta_ft + (omega - 1) * delta,
get ``(omega - 1) * F(x; delta)`` added to the layer's fine-tuned output (the
*response* to the delta), whatever way the layer got its own weights. Linear, ConvNd,
GroupNorm, LayerNorm, every RMSNorm variant (with its own eps) and Embedding are such
layers; each row of ``LAYER_KINDS`` says how to recognise one (its class, along the
MRO, by qualified name: no ComfyUI import), which parameters it takes deltas for, and
its response.

Parameters that no layer kind takes are used inline by the module that owns them (a
modulation table, a pad token, a routing gate): their use is not known row by row, so
the weak evaluation then runs as a forward of its own, with the owner holding the weak
value. ``ROW_MIXING``
lists modules whose inside does not keep the rows of the model's batch apart
(mixture-of-experts layers route tokens): they run their weak rows in a call of their
own, where every row is weak for what is inside. ``place_parameter`` applies the
tables to one changed parameter.

Adding a model family means adding rows here, not branches in the runtime.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Params = Mapping[str, Tensor | None]


def class_names(module: nn.Module) -> tuple[str, ...]:
    """The qualified names of the module's class and its bases (``package.module.Class``)."""
    return tuple(f"{c.__module__}.{c.__qualname__}" for c in type(module).__mro__)


def _channels_last(bias: Tensor, out_shape: torch.Size) -> Tensor:
    """A bias over the trailing dimensions, broadcast to the output."""
    return bias.view([1] * (len(out_shape) - bias.dim()) + list(bias.shape)).expand(out_shape)


def _channels_first(bias: Tensor, out_shape: torch.Size) -> Tensor:
    """A bias over dimension 1 (channels), broadcast to the output."""
    return bias.view([1, -1] + [1] * (len(out_shape) - 2)).expand(out_shape)


# Responses F(x; delta). ``out_shape`` is the shape of the layer's output for ``x`` (a bias-only delta needs it).

def _linear(m: nn.Module, x: Tensor, p: Params, out_shape: torch.Size) -> Tensor:
    if p.get("weight") is None:
        return _channels_last(p["bias"], out_shape)
    return F.linear(x, p["weight"], p.get("bias"))


def _conv(m: nn.Module, x: Tensor, p: Params, out_shape: torch.Size) -> Tensor:
    if p.get("weight") is None:
        return _channels_first(p["bias"], out_shape)
    return m._conv_forward(x, p["weight"], p.get("bias"))


def _group_norm(m: nn.Module, x: Tensor, p: Params, out_shape: torch.Size) -> Tensor:
    if p.get("weight") is None:
        return _channels_first(p["bias"], out_shape)
    return F.group_norm(x, m.num_groups, p["weight"], p.get("bias"), m.eps)


def _layer_norm(m: nn.Module, x: Tensor, p: Params, out_shape: torch.Size) -> Tensor:
    if p.get("weight") is None:
        return _channels_last(p["bias"], out_shape)
    return F.layer_norm(x, m.normalized_shape, p["weight"], p.get("bias"), m.eps)


def _rms_norm(name: str, eps: Callable[[nn.Module], float | None]):
    """RMSNorm over the trailing dimensions that the parameter ``name`` spans: x / rms(x) * weight."""

    def respond(m: nn.Module, x: Tensor, p: Params, out_shape: torch.Size) -> Tensor:
        weight = p[name]
        return F.rms_norm(x, tuple(weight.shape), weight, eps(m))

    return respond


def _embedding(m: nn.Module, x: Tensor, p: Params, out_shape: torch.Size) -> Tensor:
    return F.embedding(x, p["weight"], m.padding_idx)


def _no_max_norm(m: nn.Module) -> str | None:
    # max_norm renormalizes the looked-up rows by their own norm: not linear in the weight.
    return "it renormalizes its rows (max_norm)" if getattr(m, "max_norm", None) is not None else None


@dataclass(frozen=True)
class LayerKind:
    """A module whose output is linear in its parameters: how to recognise it and its response to a delta.

    ``classes``: qualified class names; a module is of this kind when one of them is in
    its MRO. ``parameters``: the parameters the kind takes deltas for. ``respond(module,
    x, params, out_shape)``: the module's output for input ``x`` with ``params`` as its
    parameters (a missing or None entry is a zero delta). ``low_rank``: LoRA factors
    (weight delta = up @ down) are applied without forming the weight.
    ``refuses(module)``: why this instance is not linear after all, or None.
    """

    name: str
    classes: tuple[str, ...]
    parameters: tuple[str, ...]
    respond: Callable[[nn.Module, Tensor, Params, torch.Size], Tensor]
    low_rank: bool = False
    refuses: Callable[[nn.Module], str | None] = field(default=lambda m: None)


def _eps(m: nn.Module) -> float | None:
    return m.eps


LAYER_KINDS: tuple[LayerKind, ...] = (
    LayerKind("Linear", ("torch.nn.modules.linear.Linear",), ("weight", "bias"), _linear, low_rank=True),
    LayerKind("Conv", ("torch.nn.modules.conv.Conv1d", "torch.nn.modules.conv.Conv2d", "torch.nn.modules.conv.Conv3d"),
              ("weight", "bias"), _conv, low_rank=True),
    LayerKind("GroupNorm", ("torch.nn.modules.normalization.GroupNorm",), ("weight", "bias"), _group_norm),
    LayerKind("LayerNorm", ("torch.nn.modules.normalization.LayerNorm",), ("weight", "bias"), _layer_norm),
    # torch's RMSNorm: ComfyUI's comfy.ops.RMSNorm derives from it (v0.8.0 through comfy.rmsnorm.RMSNorm).
    # Its eps may be None: torch then uses the input dtype's machine epsilon, as F.rms_norm does with None.
    LayerKind("RMSNorm", ("torch.nn.modules.normalization.RMSNorm",), ("weight",), _rms_norm("weight", _eps)),
    # Flux, Chroma and HunyuanVideo in ComfyUI v0.8.0: rms_norm(x, self.scale, 1e-6).
    LayerKind("RMSNorm (scale)", ("comfy.ldm.flux.layers.RMSNorm",), ("scale",), _rms_norm("scale", lambda m: 1e-6)),
    # SD3 / MMDiT and models that reuse it: rms_norm(x, self.weight, self.eps).
    LayerKind("RMSNorm (mmdit)", ("comfy.ldm.modules.diffusionmodules.mmdit.RMSNorm",), ("weight",),
              _rms_norm("weight", _eps)),
    LayerKind("Embedding", ("torch.nn.modules.sparse.Embedding",), ("weight",), _embedding, refuses=_no_max_norm),
)


def layer_kind(module: nn.Module) -> LayerKind | None:
    """The kind of ``module`` (the first row of ``LAYER_KINDS`` whose class it derives from), or None."""
    names = class_names(module)
    for kind in LAYER_KINDS:
        if any(c in names for c in kind.classes):
            return kind
    return None


# Modules whose forward(x) keeps the rows of x apart in its output but not inside: the layers inside see routed
# tokens, not batch rows. They run their weak rows in a call of their own (a mixture of experts routes each token
# to some experts; an expert sees the tokens routed to it, from any row).
ROW_MIXING: tuple[str, ...] = (
    "comfy.ldm.hidream.model.MOEFeedForwardSwiGLU",  # HiDream: forward(x) -> y, experts see routed tokens
)


def row_mixing(module: nn.Module) -> bool:
    return any(c in ROW_MIXING for c in class_names(module))


class Placement(str, Enum):
    """Where the weak model's value of a changed parameter comes into the fine-tuned model's forward."""

    LAYER = "layer"  # a layer kind's parameter: the layer's rows, by response or weak parameters
    IN_ROW_MIXING = "in a row-mixing module"  # a parameter inside a ROW_MIXING module: that module's call
    OWN_FORWARD = "own forward"  # none of the above: the weak evaluation runs as a forward of its own


@dataclass(frozen=True)
class ChangedParameter:
    """Where one changed parameter sits: its module's path, its name, and how the tables place it."""

    path: str
    name: str
    placement: Placement
    kind: LayerKind | None = None
    container: str | None = None  # the ROW_MIXING module above it (IN_ROW_MIXING)
    reason: str = ""  # why it is not guided row by row (OWN_FORWARD)


def place_parameter(root: nn.Module, key: str) -> ChangedParameter:
    """How the tables place the parameter ``key`` (a dotted path below ``root``)."""
    path, _, name = key.rpartition(".")
    module = root.get_submodule(path)
    kind = layer_kind(module)
    if kind is not None and name not in kind.parameters:
        kind = None
    refusal = None if kind is None else kind.refuses(module)
    container = next((p for p in _ancestors(path) if row_mixing(root.get_submodule(p))), None)
    if container is not None:
        return ChangedParameter(path, name, Placement.IN_ROW_MIXING, kind=None if refusal else kind, container=container)
    what = f"{type(module).__name__} {path or '(the model)'}"
    if kind is None:
        return ChangedParameter(path, name, Placement.OWN_FORWARD,
                                reason=f"{what} uses {name} inline, not row by row")
    if refusal is not None:
        return ChangedParameter(path, name, Placement.OWN_FORWARD, kind=kind, reason=f"{what}: {refusal}")
    return ChangedParameter(path, name, Placement.LAYER, kind=kind)


def _ancestors(path: str) -> Iterable[str]:
    """``a``, ``a.b``, … up to ``path`` itself, outermost first."""
    parts = path.split(".") if path else []
    for i in range(1, len(parts) + 1):
        yield ".".join(parts[:i])


__all__ = [
    "ChangedParameter",
    "LAYER_KINDS",
    "LayerKind",
    "Placement",
    "ROW_MIXING",
    "class_names",
    "layer_kind",
    "place_parameter",
    "row_mixing",
]
