"""The per-layer machinery of a sampling run: how each changed module gives the weak rows their weights.

A ``rows.RowState`` says which rows of the current forward belong to the weak model. Each
changed module has a handler, chosen by ``routing.py``:

- ``Correction`` (any layer kind, however ComfyUI holds its weights): a forward hook
  adds ``(omega - 1) * F(x; delta)`` to the weak rows of the layer's output.
- ``WeakWeights`` (a layer that computes with its own parameters): the layer runs its
  weak rows with weak parameters theta_ft + (omega - 1) * delta, formed once per
  omega in a workspace or just in time in a scratch buffer.
- ``Swap`` (an inline parameter, or any parameter of a module that is not a layer kind;
  weak forwards of their own only): the owner runs with the weak value.
- ``RowMixing`` (a module whose inside does not keep rows apart): it runs its weak
  rows in a call of their own, in which every row is weak for the handlers inside.
- ``ReadBoth`` (a layer of a pair that keeps no delta: GGUF weights): in each forward it
  reads the fine-tuned weights as the layer computes with them and the base's, and runs
  its fine-tuned rows with the first and its weak rows with theta_ft + (omega - 1) delta.
- ``WeightFunction`` (a comfy.ops layer whose weights ComfyUI reads without calling it,
  or streams; weak forwards of their own only): ComfyUI's own ``weight_function``
  adds (omega - 1) * delta to the weight it delivers.

With omega per block each handler scales the run's coefficient (omega - 1) by its module's block
factor (``Handler.factor``; docs/design.md, "Omega per block").

After the first forward with weak rows the run checks that every handler that relies on
its module being called was called (``routing.ReadWatch``).
Everything here exists only during a run: ``remove`` undoes it, and weights are never
written.
"""

from __future__ import annotations

import logging

import torch

from ...guidance import DenseDelta, GuidanceInputError, LayerDelta, prepare_correction, weak_parameter
from . import host
from .rows import ALL, RowState, chunks, segments

log = logging.getLogger(__name__)


def _first_tensor(args, kwargs) -> torch.Tensor | None:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value
    return None


class Handler:
    """One changed module's part in a run. ``install`` before the first weak forward, ``remove`` in ``finally``."""

    relies_on_call = True  # works only when ComfyUI calls the module (checked after each weak forward)
    row_capable = True  # can give chunks of rows their weights (else: weak forwards of their own only)
    per_row_omega = True  # can give each weak row its own omega (PG Sweep's batched rows)
    # The module's block factor f (omega per block): its coefficient is f (omega - 1). Set by routing.py where it is
    # not 1; at 1 the coefficient is the run's, untouched (docs/design.md, "Omega per block").
    factor = 1.0

    def __init__(self, path: str, module: torch.nn.Module, state: RowState):
        self.path, self.module, self.state = path, module, state
        self.handles: list = []

    def install(self) -> None:
        raise NotImplementedError

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def scaled(self, coefficient):
        """The module's coefficient f (omega - 1) for the run's ``coefficient`` (one value, or one per row)."""
        return coefficient if self.factor == 1.0 else coefficient * self.factor

    def begin_forward(self) -> None:
        """A forward with weak rows starts (``state.rows`` is set)."""

    def end_forward(self) -> None:
        """That forward ended, or failed."""


class Correction(Handler):
    """(omega - 1) * F(x; delta) added to the weak rows of a layer's output: exact however ComfyUI holds the weights."""

    def __init__(self, path, module, state, deltas: list[LayerDelta]):
        super().__init__(path, module, state)
        self.deltas = deltas
        self.prepared: list = []  # once per run, on the device and in the dtype the layer outputs

    def install(self) -> None:
        self.handles.append(self.module.register_forward_hook(self._hook, with_kwargs=True))

    def remove(self) -> None:
        super().remove()
        self.prepared.clear()

    def _hook(self, module, args, kwargs, out):
        if self.state.inactive:
            return None
        x = _first_tensor(args, kwargs)
        rows = self.state.weak_rows(self, x.shape[0])
        if not self.prepared:
            self.prepared.extend(prepare_correction(module, d, out.device, out.dtype) for d in self.deltas)
        if out.requires_grad:
            out = out.clone()
        for chunk in chunks(rows, x.shape[0]):
            coefficient = self.scaled(self.state.coefficient_for(chunk.stop - chunk.start))
            for correction in self.prepared:
                correction.add(x, out, chunk, coefficient)
        return out


class Scratch:
    """Just in time: room for one layer's weak parameters at a time, per device and dtype."""

    def __init__(self, size: int = 0):
        self.size = size  # elements: set once the run knows its largest layer
        self.buffers: dict[tuple, torch.Tensor] = {}

    def take(self, device, dtype) -> torch.Tensor:
        buffer = self.buffers.get((device, dtype))
        if buffer is None:
            buffer = self.buffers[(device, dtype)] = torch.empty(self.size, device=device, dtype=dtype)
        return buffer

    def clear(self) -> None:
        self.buffers.clear()


class SplitRows(Handler):
    """A layer whose weak rows run with parameters of their own: in a forward with weak rows, the layer's own forward
    runs once per consecutive chunk of rows, with ``row_parameters``' fine-tuned set or weak set in place of its own
    parameters (restored after each call, and in ``finally``)."""

    per_row_omega = False

    def install(self) -> None:
        own = type(self.module).forward.__get__(self.module)
        params = self.module._parameters

        def forward(x, *args, **kwargs):
            if self.state.inactive:
                return own(x, *args, **kwargs)
            rows = self.state.weak_rows(self, x.shape[0])
            if isinstance(self.state.coefficient, torch.Tensor):
                raise GuidanceInputError(f"Personalization guidance: {self.path} cannot take one omega per row.")
            finetuned, weak = self.row_parameters(x)
            saved = dict(params)
            outs = []
            try:
                for chunk, is_weak in segments(chunks(rows, x.shape[0]), x.shape[0]):
                    params.update(weak if is_weak else finetuned)
                    outs.append(own(x[chunk], *args, **kwargs))
                    params.update(saved)
            finally:
                params.update(saved)
            return outs[0] if len(outs) == 1 else torch.cat(outs)

        self.module.forward = forward

    def remove(self) -> None:
        self.module.__dict__.pop("forward", None)

    def row_parameters(self, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(the parameters the fine-tuned rows run with, those the weak rows run with): names to tensors; a name
        missing from the first keeps the layer's own."""
        raise NotImplementedError


class WeakWeights(SplitRows):
    """The layer's own forward, run on the fine-tuned rows as they are and on the weak rows with weak parameters.

    ``slots``: the workspace's tensors for this layer (formed once per omega), or None to form them just in
    time in ``scratch``, in the dtype the layer computes in (a layer that casts its weights to the input's dtype
    gets them in that dtype: exact, and nothing to cast).
    """

    def __init__(self, path, module, state, delta: DenseDelta, slots: dict[str, torch.Tensor] | None, scratch: Scratch):
        super().__init__(path, module, state)
        self.delta, self.slots, self.scratch = delta, slots, scratch
        self.names = list(delta.params)

    def row_parameters(self, x):
        return {}, self.weak_parameters(x)

    @torch.no_grad()
    def weak_parameters(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.slots is not None:
            return self.slots
        params = self.module._parameters
        like = params[self.names[0]]
        dtype = x.dtype if host.casts_weights(self.module) and x.is_floating_point() else like.dtype
        buffer = self.scratch.take(x.device, dtype)
        out, at = {}, 0
        for name in self.names:
            param = params[name]
            slot = buffer[at:at + param.numel()].view(param.shape)
            out[name] = weak_parameter(param, self.delta.params[name], self.scaled(self.state.coefficient), out=slot)
            at += param.numel()
        return out


class ReadBoth(SplitRows):
    """A layer whose delta is read from both models as it runs (``pairs.LazyDelta``: GGUF weights, whose dense delta
    would outweigh the quantized files). Each forward with weak rows takes the weights the loaded layer computes with
    (a GGUF layer dequantizes and patches them, as it would itself), forms the weak ones from them and the base's, one
    layer at a time, and runs its fine-tuned rows with the first and its weak rows with the second, as plain tensors
    in place of its own (so a GGUF layer takes comfy.ops' ordinary path for them)."""

    def __init__(self, path, module, state, delta, same_patches: bool):
        super().__init__(path, module, state)
        self.delta = delta
        self.same_patches = same_patches  # the sampled MODEL has the pair's patches here, nothing on top

    def row_parameters(self, x):
        return self.weights(x)

    @torch.no_grad()
    def weights(self, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(the weights the layer computes with, the weak ones): W + (omega - 1) (W_ft - W_pre) for the changed
        parameters, where W is what the sampled MODEL computes with and W_ft the pair's fine-tuned weights."""
        c = self.scaled(self.state.coefficient)
        finetuned, weak = {}, {}
        for name, tensor in self.module._parameters.items():
            if tensor is None or (name not in self.delta.names and not host.is_gguf_packed(tensor)):
                continue
            dtype = (x.dtype if x.is_floating_point() and (host.casts_weights(self.module) or host.is_gguf_packed(tensor))
                     else host.float_dtype(tensor))
            value = host.computed_weight(self.module, name, dtype, x.device)
            if value is None:
                raise GuidanceInputError(
                    f"Personalization guidance cannot read the weights of {self.path} as they are computed here "
                    "(ComfyUI casts and patches them on the fly, as in a partial load), which a pair read from two "
                    "models needs. Free memory so that the models load fully, or use the low-rank option.")
            finetuned[name] = weak[name] = value
            if name in self.delta.names:
                base = self.delta.base_value(name, dtype, x.device)
                if self.same_patches:  # W_ft + c (W_ft - W_pre), in one pass over the base's fresh copy
                    weak[name] = base.lerp_(value, 1.0 + c)
                else:  # W + c (W_ft - W_pre): W carries what a MODEL made from the pair adds on top
                    pair = self.delta.finetuned_value(name, dtype, x.device)
                    weak[name] = base.sub_(pair).mul_(-c).add_(value)
        return finetuned, weak


class Swap(Handler):
    """Parameters whose use is not known row by row (inline parameters, or a module that is no layer kind): in a
    forward where every row is weak, the module holds weak values for the whole forward, however it reads them.
    Inside a row-mixing module, for that module's weak call (``RowMixing``)."""

    row_capable = False
    per_row_omega = False
    relies_on_call = False

    def __init__(self, path, module, state, deltas: dict[str, torch.Tensor]):
        super().__init__(path, module, state)
        self.deltas = deltas
        self.saved: dict[str, torch.Tensor] | None = None
        self.in_row_mixing = False  # then its RowMixing activates it, for the weak call only

    def install(self) -> None:
        pass

    def remove(self) -> None:
        self.deactivate()

    def begin_forward(self) -> None:
        if self.state.rows is ALL and not self.in_row_mixing:
            self.activate()

    def end_forward(self) -> None:
        self.deactivate()

    @torch.no_grad()
    def activate(self) -> None:
        if self.saved is not None or self.state.inactive:
            return
        if isinstance(self.state.coefficient, torch.Tensor):
            raise GuidanceInputError(f"Personalization guidance: {self.path} cannot take one omega per row.")
        module = self.module
        tensors = {**module._parameters, **module._buffers}
        self.saved = {name: tensors[name] for name in self.deltas}
        for name, delta in self.deltas.items():
            _set(module, name, weak_parameter(tensors[name], delta, self.scaled(self.state.coefficient)))
        self.state.mark_ran(self)

    def deactivate(self) -> None:
        if self.saved is not None:
            for name, tensor in self.saved.items():
                _set(self.module, name, tensor)
            self.saved = None


def _set(module: torch.nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Put ``tensor`` in the module's parameter or buffer ``name`` without nn.Module's type checks."""
    (module._parameters if name in module._parameters else module._buffers)[name] = tensor


class RowMixing(Handler):
    """A module whose inside routes tokens between rows (mixture of experts): its weak rows run in a call of their
    own, in which every row is weak for the handlers inside it, and its fine-tuned rows in another."""

    def __init__(self, path, module, state, inner: list[Handler]):
        super().__init__(path, module, state)
        self.swaps = [h for h in inner if isinstance(h, Swap)]
        for swap in self.swaps:
            swap.in_row_mixing = True

    def install(self) -> None:
        own = type(self.module).forward.__get__(self.module)
        state = self.state

        def forward(x, *args, **kwargs):
            if state.inactive:
                return own(x, *args, **kwargs)
            rows = state.weak_rows(self, x.shape[0])
            weak = segments(chunks(rows, x.shape[0]), x.shape[0])
            outs = []
            for chunk, is_weak in weak:
                with state.weak_call(ALL if is_weak else None, chunk.stop - chunk.start):
                    if is_weak:
                        for swap in self.swaps:
                            swap.activate()
                    try:
                        outs.append(own(x[chunk], *args, **kwargs))
                    finally:
                        for swap in self.swaps:
                            swap.deactivate()
            return outs[0] if len(outs) == 1 else torch.cat(outs)

        self.module.forward = forward

    def remove(self) -> None:
        self.module.__dict__.pop("forward", None)


class WeightFunction(Handler):
    """ComfyUI's ``weight_function`` adds (omega - 1) * delta to the weight ``cast_bias_weight`` delivers, in weak
    forwards of their own: exact however ComfyUI holds or reads the weights (fused kernels, dynamic VRAM)."""

    row_capable = False
    per_row_omega = False
    relies_on_call = False

    def __init__(self, path, module, state, delta: DenseDelta):
        super().__init__(path, module, state)
        self.delta = delta
        self.saved: dict | None = None

    def install(self) -> None:
        pass

    def begin_forward(self) -> None:
        if self.state.inactive:
            return
        if self.state.rows is not ALL:
            raise GuidanceInputError(f"Personalization guidance: {self.path} can only be guided in a weak forward of "
                                     "its own.")
        coefficient = self.scaled(self.state.coefficient)

        def add(delta):
            def function(weight):
                self.state.mark_ran(self)
                return torch.add(weight, delta.to(device=weight.device, dtype=weight.dtype), alpha=coefficient)
            return function

        self.saved = host.with_weight_functions(self.module, {name: [add(d)] for name, d in self.delta.params.items()})

    def end_forward(self) -> None:
        if self.saved is not None:
            host.restore_attributes(self.module, self.saved)
            self.saved = None

    def remove(self) -> None:
        self.end_forward()


__all__ = [
    "Correction",
    "Handler",
    "ReadBoth",
    "SplitRows",
    "RowMixing",
    "Scratch",
    "Swap",
    "WeakWeights",
    "WeightFunction",
]
