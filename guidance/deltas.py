"""Weight deltas: delta = theta_ft - theta_pre, and the weak model theta_pre + omega * delta.

The weak model is never a separate model. Every layer with parameters in the UNets
we support (Linear, ConvNd, GroupNorm, LayerNorm) is affine in its own parameters, so
given the layer's input x,

    F(x; theta_ft + (omega - 1) * delta) = F(x; theta_ft) + (omega - 1) * F_delta(x)

where F_delta(x) is the layer applied with the delta as its parameters
(``layer_response``). The fine-tuned weights stay as they are; the rows of a batch
that belong to the weak model get ``(omega - 1) * F_delta(x)`` added to the layer's
output (``add_weak_correction``; ``prepare_correction`` makes the same addition with
fewer operations, for use inside a sampling loop). Exact, and ``omega`` may change
every step.

Where a pair changes every layer (a full fine-tune), the weak rows would pass every
layer twice. There each layer's weak parameters theta_ft + (omega - 1) * delta are
formed instead (``weak_parameter``), and the layer runs its weak rows with them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import GuidanceInputError

# Prefixes under which checkpoints store the denoiser, longest first.
UNET_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
# How many mismatched names an error message lists.
_SHOWN = 5


def unet_state_dict(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The denoiser's tensors of a checkpoint or bare UNet state dict, keyed without prefix."""
    for prefix in UNET_PREFIXES:
        picked = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        if picked:
            return picked
    return dict(sd)


def check_finite(tensors: Mapping[str, Tensor], what: str) -> None:
    """Raise naming the first tensors that hold NaN or Inf."""
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise GuidanceInputError(f"{what} holds NaN or Inf in {len(bad)} tensor(s), first: {', '.join(bad[:_SHOWN])}.")


def check_same_architecture(base: Mapping[str, tuple], finetuned: Mapping[str, tuple]) -> None:
    """Raise naming the first tensors whose names or shapes differ between two architectures.

    Both arguments map tensor names to shapes.
    """
    only_base = sorted(set(base) - set(finetuned))
    only_ft = sorted(set(finetuned) - set(base))
    if only_base or only_ft:
        parts = []
        if only_base:
            parts.append(f"only in the base: {', '.join(only_base[:_SHOWN])}")
        if only_ft:
            parts.append(f"only in the fine-tune: {', '.join(only_ft[:_SHOWN])}")
        raise GuidanceInputError(
            "Base and fine-tuned models are different architectures "
            f"({len(only_base) + len(only_ft)} tensors unmatched; {'; '.join(parts)})."
        )
    shapes = [
        f"{k} {tuple(base[k])} vs {tuple(finetuned[k])}"
        for k in sorted(base)
        if tuple(base[k]) != tuple(finetuned[k])
    ]
    if shapes:
        raise GuidanceInputError(
            f"Base and fine-tuned models are different architectures ({len(shapes)} tensors differ in shape, "
            f"first: {'; '.join(shapes[:_SHOWN])})."
        )


def weight_delta(base: Mapping[str, Tensor], finetuned: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """delta = theta_ft - theta_pre, tensor by tensor, formed in fp32.

    Both state dicts are aligned first (``unet_state_dict``), so the result is keyed
    without checkpoint prefix. Names or shapes that differ mean two different
    architectures: the error names the first of them. NaN or Inf anywhere is an
    error. Tensors whose delta is exactly zero (frozen during fine-tuning) are left out.
    """
    base, finetuned = unet_state_dict(base), unet_state_dict(finetuned)
    check_same_architecture({k: v.shape for k, v in base.items()}, {k: v.shape for k, v in finetuned.items()})
    check_finite(base, "The base model")
    check_finite(finetuned, "The fine-tuned model")
    delta = {}
    for k in sorted(base):
        if not base[k].is_floating_point():
            continue
        d = finetuned[k].to(torch.float32) - base[k].to(torch.float32)
        if torch.count_nonzero(d):
            delta[k] = d
    check_finite(delta, "The weight delta (fine-tuned minus base)")
    return delta


@dataclass
class DenseDelta:
    """A layer's delta as full tensors; either may be None (no change)."""

    weight: Tensor | None = None
    bias: Tensor | None = None

    def tensors(self) -> list[Tensor]:
        return [t for t in (self.weight, self.bias) if t is not None]


@dataclass
class LowRankDelta:
    """A LoRA delta: weight delta = scale * up @ down, with ``up`` (out, r, ...) and ``down`` (r, in, ...)."""

    up: Tensor
    down: Tensor
    scale: float

    def tensors(self) -> list[Tensor]:
        return [self.up, self.down]


LayerDelta = DenseDelta | LowRankDelta

SUPPORTED_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.GroupNorm, nn.LayerNorm)


def check_layer(name: str, layer: nn.Module, delta: LayerDelta) -> None:
    """Raise unless ``layer_response`` can apply ``delta`` to ``layer`` exactly."""
    if not isinstance(layer, SUPPORTED_LAYERS):
        raise GuidanceInputError(
            f"Layer {name} ({type(layer).__name__}) has a weight delta, but only "
            f"{', '.join(t.__name__ for t in SUPPORTED_LAYERS)} layers can be interpolated."
        )
    if isinstance(delta, LowRankDelta):
        if not isinstance(layer, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)) or getattr(layer, "groups", 1) != 1:
            raise GuidanceInputError(f"Layer {name} ({type(layer).__name__}) cannot take a low-rank delta.")
        out_features, rank = layer.weight.shape[0], delta.down.shape[0]
        fits = (
            delta.up.shape[0] == out_features
            and delta.up.numel() == out_features * rank
            and delta.down.numel() == rank * math.prod(layer.weight.shape[1:])
        )
        if not fits:
            raise GuidanceInputError(
                f"The low-rank delta for {name} (up {tuple(delta.up.shape)}, down {tuple(delta.down.shape)}) "
                f"does not fit its weight {tuple(layer.weight.shape)}."
            )
        return
    for what, ref, d in (("weight", layer.weight, delta.weight), ("bias", layer.bias, delta.bias)):
        if d is not None and (ref is None or ref.shape != d.shape):
            shape = None if ref is None else tuple(ref.shape)
            raise GuidanceInputError(f"The {what} delta for {name} has shape {tuple(d.shape)}, the layer has {shape}.")


def layer_response(layer: nn.Module, x: Tensor, delta: LayerDelta, out_shape: torch.Size) -> Tensor:
    """F_delta(x): ``layer`` applied to ``x`` with ``delta`` as its parameters (no fine-tuned weights).

    ``out_shape`` is the shape of the layer's output for ``x``. An empty DenseDelta
    has no response: callers skip it (``add_weak_correction``).
    """
    if isinstance(delta, LowRankDelta):
        # The scale goes on the rank-r intermediate, the smallest tensor on the way.
        down = delta.down.reshape(delta.down.shape[0], *layer.weight.shape[1:])
        if isinstance(layer, nn.Linear):
            return F.linear(F.linear(x, down) * delta.scale, delta.up.reshape(delta.up.shape[0], -1))
        h = layer._conv_forward(x, down, None) * delta.scale
        up = delta.up.reshape(delta.up.shape[0], delta.down.shape[0], *[1] * (h.dim() - 2))
        conv = (F.conv1d, F.conv2d, F.conv3d)[h.dim() - 3]
        return conv(h, up)
    weight, bias = delta.weight, delta.bias
    if weight is None:
        # Bias only: the response is the bias, broadcast over the output.
        if isinstance(layer, (nn.Linear, nn.LayerNorm)):  # channels last (LayerNorm: all normalized dims)
            view = [1] * (len(out_shape) - bias.dim()) + list(bias.shape)
        else:  # channels first
            view = [1, -1] + [1] * (len(out_shape) - 2)
        return bias.view(view).expand(out_shape)
    if isinstance(layer, nn.Linear):
        return F.linear(x, weight, bias)
    if isinstance(layer, nn.GroupNorm):
        return F.group_norm(x, layer.num_groups, weight, bias, layer.eps)
    if isinstance(layer, nn.LayerNorm):
        return F.layer_norm(x, layer.normalized_shape, weight, bias, layer.eps)
    return layer._conv_forward(x, weight, bias)


Rows = slice | Tensor


def rows_for_layer(batch_rows: Rows, batch_size: int, layer_batch: int) -> Rows:
    """The rows of a layer's input that belong to the batch rows ``batch_rows``.

    Rows are a slice (a contiguous chunk, as ComfyUI batches each cond) or an index
    tensor. Layers see the model's batch either as is or with each batch row expanded
    into consecutive rows (``(b t) ...`` layouts); anything else is an error.
    """
    if layer_batch == batch_size:
        return batch_rows
    if layer_batch % batch_size:
        raise GuidanceInputError(
            f"A layer saw a batch of {layer_batch} rows for a model batch of {batch_size}: "
            "this architecture cannot be guided row by row."
        )
    per_row = layer_batch // batch_size
    if isinstance(batch_rows, slice):
        return slice(batch_rows.start * per_row, batch_rows.stop * per_row)
    offsets = torch.arange(per_row, device=batch_rows.device)
    return (batch_rows[:, None] * per_row + offsets).flatten()


Coefficient = float | Tensor  # one value for all rows, or one per row (a 1-D tensor as long as the rows)


def per_row(coefficient: Tensor, like: Tensor) -> Tensor:
    """A per-row coefficient shaped to broadcast over ``like``'s rows."""
    return coefficient.to(device=like.device, dtype=like.dtype).view(-1, *[1] * (like.dim() - 1))


def add_weak_correction(layer: nn.Module, x: Tensor, out: Tensor, delta: LayerDelta, rows: Rows, coefficient: Coefficient) -> Tensor:
    """``out`` with ``coefficient * F_delta(x)`` added on ``rows``: turns fine-tuned rows into weak rows.

    With ``coefficient = omega - 1`` those rows become the output of theta_pre + omega * delta;
    a 1-D tensor gives each of the rows its own omega (in the order of ``rows``).
    With a slice of rows the addition is in place (views, no copies) unless ``out``
    takes part in autograd; with an index tensor it returns a new tensor.
    """
    if isinstance(delta, DenseDelta) and not delta.tensors():
        return out
    x_rows = x[rows] if isinstance(rows, slice) else x.index_select(0, rows)
    correction = layer_response(layer, x_rows, delta, (x_rows.shape[0], *out.shape[1:])).to(out.dtype)
    if isinstance(coefficient, Tensor):
        correction, coefficient = correction * per_row(coefficient, correction), 1.0
    if isinstance(rows, slice):
        if out.requires_grad:
            out = out.clone()
        out[rows].add_(correction, alpha=coefficient)
        return out
    return out.index_add(0, rows, correction, alpha=coefficient)


def weak_parameter(finetuned: Tensor, delta: Tensor, coefficient: float, out: Tensor | None = None) -> Tensor:
    """theta_ft + coefficient * delta: with ``coefficient = omega - 1``, the weak model's parameter.

    theta_ft + (omega - 1) * delta = theta_pre + omega * delta. Computed in the dtype of
    ``finetuned`` (written into ``out`` when given), with the delta brought to its device.
    """
    delta = delta.to(device=finetuned.device, dtype=finetuned.dtype)
    return torch.add(finetuned, delta, alpha=coefficient, out=out)


class LowRankCorrection:
    """``add_weak_correction`` for one layer's LowRankDelta, prepared for a device and dtype.

    For Linear layers the up projection and the addition are one fused multiply-add
    in place, and the scale rides on its ``alpha``: two operations per chunk of rows
    instead of five, which matters when a step runs hundreds of them. Nothing is
    copied when the factors already have the device and dtype.
    """

    def __init__(self, layer: nn.Module, delta: LowRankDelta, device: torch.device, dtype: torch.dtype):
        rank = delta.down.shape[0]
        self.scale = delta.scale
        self.down = delta.down.to(device=device, dtype=dtype).reshape(rank, *layer.weight.shape[1:])
        up = delta.up.to(device=device, dtype=dtype).reshape(delta.up.shape[0], rank)
        self.linear = isinstance(layer, nn.Linear)
        if self.linear:
            self.up_t = up.t()
        else:
            self.up = up.reshape(*up.shape, *[1] * (self.down.dim() - 2))
            self.conv = layer._conv_forward
            self.conv_up = (F.conv1d, F.conv2d, F.conv3d)[self.down.dim() - 3]

    def add(self, x: Tensor, out: Tensor, rows: slice, coefficient: Coefficient) -> None:
        """Add ``coefficient * F_delta(x)`` to ``out`` on ``rows``, in place (per-row coefficients: see
        ``add_weak_correction``; they scale the rank-r intermediate)."""
        target = out[rows]
        h = F.linear(x[rows], self.down) if self.linear else self.conv(x[rows], self.down, None)
        if isinstance(coefficient, Tensor):
            h = h * per_row(coefficient * self.scale, h)
            alpha = 1.0
        else:
            alpha = coefficient * self.scale
        if self.linear and target.is_contiguous():
            target.view(-1, target.shape[-1]).addmm_(h.reshape(-1, h.shape[-1]), self.up_t, alpha=alpha)
        elif self.linear:
            target.add_(F.linear(h, self.up_t.t()), alpha=alpha)
        else:
            target.add_(self.conv_up(h, self.up), alpha=alpha)


class DenseCorrection:
    """``add_weak_correction`` for one layer's DenseDelta, with the delta moved to a device and dtype once."""

    def __init__(self, layer: nn.Module, delta: DenseDelta, device: torch.device, dtype: torch.dtype):
        def move(t):
            return None if t is None else t.to(device=device, dtype=dtype)

        self.layer = layer
        self.delta = DenseDelta(weight=move(delta.weight), bias=move(delta.bias))

    def add(self, x: Tensor, out: Tensor, rows: slice, coefficient: Coefficient) -> None:
        """Add ``coefficient * F_delta(x)`` to ``out`` on ``rows``, in place."""
        add_weak_correction(self.layer, x, out, self.delta, rows, coefficient)


def prepare_correction(layer: nn.Module, delta: LayerDelta, device: torch.device, dtype: torch.dtype):
    """The weak correction of ``delta`` on ``layer``, ready to add in place (``.add(x, out, rows, coefficient)``)."""
    if isinstance(delta, LowRankDelta):
        return LowRankCorrection(layer, delta, device, dtype)
    return DenseCorrection(layer, delta, device, dtype)
