"""guidance.layers: the table of layer kinds, and where each changed parameter goes (docs/design.md, "Routes and handlers").

Torch-only tier. ComfyUI's own layer classes are matched by qualified name; here
stand-ins with those names check the rows that name ComfyUI classes (their forwards
written from ComfyUI's source), and torch's classes check the rest.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from guidance import DenseDelta, Placement, add_weak_correction, layer_kind, place_parameter
from guidance.layers import LAYER_KINDS, ROW_MIXING, class_names

FAST = settings(max_examples=30, deadline=None, database=None)


def _named(module_name: str, class_name: str, base: type = nn.Module) -> type:
    """A class that ComfyUI would define as ``module_name.class_name``."""
    return type(class_name, (base,), {"__module__": module_name, "__qualname__": class_name})


class _FluxRMSNorm(_named("comfy.ldm.flux.layers", "RMSNorm")):
    """ComfyUI v0.8.0's Flux RMSNorm: rms_norm(x, self.scale, 1e-6)."""

    def __init__(self, dim):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.scale


class _MMDiTRMSNorm(_named("comfy.ldm.modules.diffusionmodules.mmdit", "RMSNorm")):
    """ComfyUI's SD3 RMSNorm: rms_norm(x, self.weight, self.eps)."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


@pytest.mark.parametrize("make, name", [(lambda: _FluxRMSNorm(6), "scale"), (lambda: _MMDiTRMSNorm(6, 1e-5), "weight")])
@FAST
@given(seed=st.integers(0, 2**31 - 1), omega=st.floats(0.0, 1.0))
def test_comfyui_rmsnorm_rows_match_their_forward(make, name, seed, omega):
    """The response of each ComfyUI RMSNorm row, on the weak rows, equals the layer run with weak weights by hand."""
    g = torch.Generator().manual_seed(seed)
    layer = make()
    with torch.no_grad():
        getattr(layer, name).copy_(torch.randn(6, generator=g))
    x = torch.randn(3, 4, 6, generator=g) * 2
    delta = torch.randn(6, generator=g)
    rows = slice(1, 3)
    got = add_weak_correction(layer, x, layer(x), DenseDelta(**{name: delta}), rows, omega - 1.0)
    weak = make()
    with torch.no_grad():
        getattr(weak, name).copy_(getattr(layer, name) + (omega - 1.0) * delta)
    torch.testing.assert_close(got[rows], weak(x)[rows], rtol=1e-5, atol=1e-5)
    assert torch.equal(got[0], layer(x)[0])


def test_every_kind_is_found_by_class_and_comfyui_subclasses_match():
    class ComfyLinear(nn.Linear):  # comfy.ops layers derive from torch's
        pass

    assert layer_kind(ComfyLinear(2, 3)).name == "Linear"
    assert layer_kind(nn.Conv3d(1, 1, 1)).name == "Conv"
    assert layer_kind(nn.RMSNorm(4)).name == "RMSNorm"
    assert layer_kind(nn.Embedding(3, 2)).name == "Embedding"
    assert layer_kind(_FluxRMSNorm(4)).name == "RMSNorm (scale)"
    assert layer_kind(nn.ConvTranspose2d(1, 1, 1)) is None and layer_kind(nn.PReLU()) is None
    assert len({kind.name for kind in LAYER_KINDS}) == len(LAYER_KINDS)
    assert class_names(_FluxRMSNorm(1))[:2] == ("test_layers._FluxRMSNorm", "comfy.ldm.flux.layers.RMSNorm")


class _Block(nn.Module):
    """A transformer block with an inline parameter (like Wan's modulation) beside its layers."""

    def __init__(self):
        super().__init__()
        self.modulation = nn.Parameter(torch.zeros(1, 2, 4))
        self.proj = nn.Linear(4, 4)
        self.norm = nn.Embedding(5, 4, max_norm=1.0)


MoE = _named("comfy.ldm.hidream.model", "MOEFeedForwardSwiGLU")


class _Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = _Block()
        self.moe = MoE()
        self.moe.gate = nn.Module()
        self.moe.gate.weight = nn.Parameter(torch.zeros(2, 4))
        self.moe.expert = nn.Linear(4, 4)


def test_place_parameter_follows_the_tables():
    model = _Model()
    assert "comfy.ldm.hidream.model.MOEFeedForwardSwiGLU" in ROW_MIXING
    layer = place_parameter(model, "block.proj.weight")
    assert layer.placement == Placement.LAYER and layer.kind.name == "Linear" and not layer.reason
    inline = place_parameter(model, "block.modulation")
    assert inline.placement == Placement.OWN_FORWARD and "modulation" in inline.reason and "block" in inline.reason
    refused = place_parameter(model, "block.norm.weight")  # an Embedding that renormalizes its rows
    assert refused.placement == Placement.OWN_FORWARD and "max_norm" in refused.reason and refused.kind is not None
    expert = place_parameter(model, "moe.expert.bias")
    assert expert.placement == Placement.IN_ROW_MIXING and expert.container == "moe" and expert.kind.name == "Linear"
    gate = place_parameter(model, "moe.gate.weight")
    assert gate.placement == Placement.IN_ROW_MIXING and gate.kind is None
