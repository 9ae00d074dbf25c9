"""Weight deltas: delta = theta_ft - theta_pre, and the weak model theta_pre + omega * delta.

The weak model is never a separate model. Every layer kind of ``guidance.layers`` is
linear in its own parameters, so given the layer's input x,

    F(x; theta_ft + (omega - 1) * delta) = F(x; theta_ft) + (omega - 1) * F(x; delta)

where F(x; delta) is the layer's response to the delta (``LayerKind.respond``). The
fine-tuned weights stay as they are; the rows of a batch that belong to the weak model
get ``(omega - 1) * F(x; delta)`` added to the layer's output (``add_weak_correction``;
``prepare_correction`` makes the same addition with fewer operations, for use inside a
sampling loop). Exact, and ``omega`` may change every step.

Where a pair changes every layer (a full fine-tune), the weak rows would pass every
layer twice. There each layer's weak parameters theta_ft + (omega - 1) * delta are
formed instead (``weak_parameter``), and the layer runs its weak rows with them.

Deltas are formed one tensor at a time (``tensor_delta``): in fp32, checked, and
stored in their final dtype at once, so that forming a pair never holds more than the
two models, the stored delta and one tensor in fp32. A delta too large for memory may
be kept as low-rank factors instead (``low_rank_factors``): an approximation, whose
error is reported.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import GuidanceInputError
from .layers import LayerKind, layer_kind

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


# Elements formed at a time: 4 MiB of fp32, small enough to stay in the CPU's cache between the passes.
_CHUNK = 1 << 20


def tensor_delta(name: str, base: Tensor, finetuned: Tensor, dtype: torch.dtype = torch.float32) -> Tensor | None:
    """finetuned - base for one tensor: formed in fp32, stored as ``dtype``; None where it is exactly zero.

    Formed a chunk at a time in two small fp32 buffers and written once in ``dtype``, so
    that forming a whole model's delta never holds more than that delta and one tensor in
    fp32, and each element is read and written once. One reduction per chunk (its minimum
    and maximum) finds NaN or Inf, in either input, from an overflow or from a value that
    ``dtype`` cannot hold, and an all-zero delta; the error names the tensor and the side.
    """
    out = torch.empty(base.shape, dtype=dtype, device=base.device)
    flat_out, flat_base, flat_ft = out.view(-1), base.reshape(-1), finetuned.reshape(-1)
    wide = dtype == torch.float32
    size = min(_CHUNK, out.numel())
    theirs = torch.empty(size, dtype=torch.float32, device=base.device)
    mine = None if wide else torch.empty(size, dtype=torch.float32, device=base.device)
    largest, limit = 0.0, torch.finfo(dtype).max
    for start in range(0, out.numel(), _CHUNK):
        part = slice(start, min(start + _CHUNK, out.numel()))
        n = part.stop - part.start
        work = flat_out[part] if wide else mine[:n]
        work.copy_(flat_ft[part])
        other = theirs[:n]
        other.copy_(flat_base[part])  # both sides in fp32 first: mixed-dtype arithmetic is slow on some CPUs
        work.sub_(other)
        low, high = torch.aminmax(work)  # NaN if any NaN
        peak = max(-float(low), float(high))
        if not peak <= limit:
            if not bool(torch.isfinite(base).all()):
                raise GuidanceInputError(f"The base model holds NaN or Inf in {name}.")
            if not bool(torch.isfinite(finetuned).all()):
                raise GuidanceInputError(f"The fine-tuned model holds NaN or Inf in {name}.")
            raise GuidanceInputError(f"The weight delta (fine-tuned minus base) of {name} overflows {dtype}.")
        largest = max(largest, peak)
        if not wide:
            flat_out[part].copy_(work)
    return out if largest > 0.0 else None


def weight_delta(base: Mapping[str, Tensor], finetuned: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """delta = theta_ft - theta_pre for two state dicts, tensor by tensor (``tensor_delta``), in fp32.

    Both state dicts are aligned first (``unet_state_dict``), so the result is keyed
    without checkpoint prefix. Names or shapes that differ mean two different
    architectures: the error names the first of them. NaN or Inf anywhere is an
    error. Tensors whose delta is exactly zero (frozen during fine-tuning) are left out.
    """
    base, finetuned = unet_state_dict(base), unet_state_dict(finetuned)
    check_same_architecture({k: v.shape for k, v in base.items()}, {k: v.shape for k, v in finetuned.items()})
    delta = {}
    for k in sorted(base):
        if not base[k].is_floating_point():
            continue
        d = tensor_delta(k, base[k], finetuned[k])
        if d is not None:
            delta[k] = d
    return delta


class DenseDelta:
    """A module's delta as full tensors, by parameter name (``weight``, ``bias``, ``scale``, ``modulation``, ...)."""

    def __init__(self, weight: Tensor | None = None, bias: Tensor | None = None, **others: Tensor | None):
        self.params: dict[str, Tensor] = {
            k: v for k, v in (("weight", weight), ("bias", bias), *others.items()) if v is not None
        }

    @property
    def weight(self) -> Tensor | None:
        return self.params.get("weight")

    @property
    def bias(self) -> Tensor | None:
        return self.params.get("bias")

    def tensors(self) -> list[Tensor]:
        return list(self.params.values())

    def __repr__(self) -> str:
        return f"DenseDelta({', '.join(f'{k}={tuple(v.shape)}' for k, v in self.params.items())})"


@dataclass
class LowRankDelta:
    """A LoRA delta: weight delta = scale * up @ down, with ``up`` (out, r, ...) and ``down`` (r, in, ...)."""

    up: Tensor
    down: Tensor
    scale: float
    # For a low-rank approximation of a dense delta: the fraction of its squared norm that the factors keep.
    kept: float | None = field(default=None, compare=False)

    def tensors(self) -> list[Tensor]:
        return [self.up, self.down]


LayerDelta = DenseDelta | LowRankDelta


def check_layer(name: str, layer: nn.Module, delta: LayerDelta) -> LayerKind:
    """The layer's kind, after checking that ``delta`` fits it; raise naming the layer otherwise."""
    kind = layer_kind(layer)
    if kind is None:
        raise GuidanceInputError(f"Layer {name} ({type(layer).__name__}) is not a layer kind of guidance.layers.")
    if isinstance(delta, LowRankDelta):
        if not kind.low_rank or getattr(layer, "groups", 1) != 1:
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
        return kind
    for what, d in delta.params.items():
        if what not in kind.parameters:
            raise GuidanceInputError(f"Layer {name} ({type(layer).__name__}) has no parameter {what} of its kind.")
        ref = getattr(layer, what, None)
        if ref is None or ref.shape != d.shape:
            shape = None if ref is None else tuple(ref.shape)
            raise GuidanceInputError(f"The {what} delta for {name} has shape {tuple(d.shape)}, the layer has {shape}.")
    return kind


def layer_response(layer: nn.Module, x: Tensor, delta: LayerDelta, out_shape: torch.Size) -> Tensor:
    """F(x; delta): ``layer`` applied to ``x`` with ``delta`` as its parameters (no fine-tuned weights).

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
    return layer_kind(layer).respond(layer, x, delta.params, out_shape)


Rows = slice | Tensor

Coefficient = float | Tensor  # one value for all rows, or one per row (a 1-D tensor as long as the rows)


def per_row(coefficient: Tensor, like: Tensor) -> Tensor:
    """A per-row coefficient shaped to broadcast over ``like``'s rows."""
    return coefficient.to(device=like.device, dtype=like.dtype).view(-1, *[1] * (like.dim() - 1))


def add_weak_correction(layer: nn.Module, x: Tensor, out: Tensor, delta: LayerDelta, rows: Rows, coefficient: Coefficient) -> Tensor:
    """``out`` with ``coefficient * F(x; delta)`` added on ``rows``: turns fine-tuned rows into weak rows.

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
    ``out`` when given (a buffer in the layer's compute dtype, which may be wider than
    ``finetuned``'s), else of ``finetuned``; nothing but ``out`` is allocated then.
    """
    if out is None:
        delta = delta.to(device=finetuned.device, dtype=finetuned.dtype)
        return torch.add(finetuned, delta, alpha=coefficient)
    out.copy_(finetuned)
    return out.add_(delta.to(device=out.device), alpha=coefficient)


def low_rank_factors(delta: Tensor, rank: int, energy: float) -> LowRankDelta | None:
    """The best approximation of a weight delta (Linear or ConvNd) of its rank: its truncated SVD, as factors.

    Keeps the fewest singular values whose squares hold at least ``energy`` of the
    delta's squared norm, and at most ``rank`` of them (``rank`` 0: no cap). The
    singular vectors come from the Gram matrix of the delta's shorter side (one matrix
    product and a symmetric eigendecomposition: a few times faster than an SVD on a CPU),
    and the factors project the delta onto the kept ones, which is the truncated SVD
    (Eckart-Young). Returns factors with ``scale`` 1 and the kept fraction, or None when
    the factors would not be smaller than the delta itself (then keep it dense).
    """
    out_features = delta.shape[0]
    matrix = delta.reshape(out_features, -1).to(torch.float32)
    rows, cols = matrix.shape
    cap = min(rows, cols) if rank <= 0 else min(rank, rows, cols)
    wide = cols > rows
    gram = matrix @ matrix.t() if wide else matrix.t() @ matrix
    squares, vectors = torch.linalg.eigh(gram)  # ascending
    squares, vectors = squares.flip(0).clamp_min(0).double(), vectors.flip(1)
    total = float(squares.sum())
    cumulative = squares.cumsum(0) / total
    needed = int(torch.searchsorted(cumulative, torch.tensor(min(energy, 1.0), dtype=torch.float64))) + 1
    r = max(1, min(cap, needed))
    if r * (rows + cols) >= matrix.numel():
        return None
    basis = vectors[:, :r]
    up, down = (basis, basis.t() @ matrix) if wide else (matrix @ basis, basis.t())
    kept = float(torch.linalg.vector_norm(down if wide else up).double() ** 2 / total)
    return LowRankDelta(up=up.reshape(out_features, r, *[1] * (delta.dim() - 2)).contiguous(),
                        down=down.reshape(r, *delta.shape[1:]).contiguous(), scale=1.0, kept=min(kept, 1.0))


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
        """Add ``coefficient * F(x; delta)`` to ``out`` on ``rows``, in place (per-row coefficients: see
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
    """``add_weak_correction`` for one layer's DenseDelta on a device and in a dtype.

    Tensors that already have the device and dtype are used as they are; others are
    converted at each call, one layer at a time, so that a run never holds a second
    copy of the whole delta (a model stored in fp16 and computed in fp32, say).
    """

    def __init__(self, layer: nn.Module, delta: DenseDelta, device: torch.device, dtype: torch.dtype):
        self.layer, self.delta, self.device, self.dtype = layer, delta, device, dtype
        self.ready = all(t.device == device and t.dtype == dtype for t in delta.tensors())

    def add(self, x: Tensor, out: Tensor, rows: slice, coefficient: Coefficient) -> None:
        """Add ``coefficient * F(x; delta)`` to ``out`` on ``rows``, in place."""
        delta = self.delta
        if not self.ready:
            delta = DenseDelta(**{k: v.to(device=self.device, dtype=self.dtype) for k, v in delta.params.items()})
        add_weak_correction(self.layer, x, out, delta, rows, coefficient)


def prepare_correction(layer: nn.Module, delta: LayerDelta, device: torch.device, dtype: torch.dtype):
    """The weak correction of ``delta`` on ``layer``, ready to add in place (``.add(x, out, rows, coefficient)``)."""
    if isinstance(delta, LowRankDelta):
        return LowRankCorrection(layer, delta, device, dtype)
    return DenseCorrection(layer, delta, device, dtype)
