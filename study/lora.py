"""A tiny LoRA: low-rank adapters on a model's Linear and Conv2d layers.

``theta_ft = theta_pre + s * scale * up @ down`` layer by layer, where ``s`` is the
strength artists set (ComfyUI's ``strength_model``). The weak model of
personalization guidance is the same LoRA at strength ``omega * s``
(``set_strength``), so one copy of the base weights serves both.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import Tensor, nn


class LoRA(nn.Module):
    """``base(x) + strength * (alpha / rank) * up(down(x))``; ``base`` is frozen and ``up`` starts at zero."""

    def __init__(self, base: nn.Linear | nn.Conv2d, rank: int, alpha: float):
        super().__init__()
        self.base = base.requires_grad_(False)
        if isinstance(base, nn.Linear):
            self.down = nn.Linear(base.in_features, rank, bias=False)
            self.up = nn.Linear(rank, base.out_features, bias=False)
        else:
            self.down = nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride, base.padding, bias=False)
            self.up = nn.Conv2d(rank, base.out_channels, 1, bias=False)
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.up.weight)
        self.scale = alpha / rank
        self.strength = 1.0

    def forward(self, x: Tensor) -> Tensor:
        out = self.base(x)
        if self.strength == 0.0:
            return out
        return out + self.up(self.down(x)) * (self.scale * self.strength)


def add_lora(model: nn.Module, rank: int, alpha: float) -> list[nn.Parameter]:
    """Wrap every Linear and Conv2d of ``model`` in place; freeze everything else. Returns the LoRA parameters."""
    model.requires_grad_(False)
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    params = []
    for name, layer in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        wrapped = LoRA(layer, rank, alpha)
        setattr(parent, child, wrapped)
        params += [wrapped.down.weight, wrapped.up.weight]
    return params


def set_strength(model: nn.Module, strength: float) -> None:
    """Set the strength of every LoRA in ``model``."""
    for m in model.modules():
        if isinstance(m, LoRA):
            m.strength = strength


def unwrapped(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every LoRA replaced by its base layer (the plain architecture)."""
    plain = copy.deepcopy(model)
    for name, m in list(plain.named_modules()):
        if isinstance(m, LoRA):
            parent_name, _, child = name.rpartition(".")
            parent = plain.get_submodule(parent_name) if parent_name else plain
            setattr(parent, child, m.base)
    return plain


@torch.no_grad()
def merged_state_dict(model: nn.Module, strength: float = 1.0) -> dict[str, Tensor]:
    """The plain model's state dict with the LoRA merged at ``strength`` (keys as before wrapping)."""
    out = {}
    for name, tensor in model.state_dict().items():
        if ".down." in name or ".up." in name:
            continue
        out[name.replace(".base.", ".")] = tensor.clone()
    for name, m in model.named_modules():
        if isinstance(m, LoRA):
            up = m.up.weight.flatten(1)
            down = m.down.weight.flatten(1)
            delta = (up @ down).view_as(m.base.weight) * (m.scale * strength)
            out[f"{name}.weight"] += delta
    return out
