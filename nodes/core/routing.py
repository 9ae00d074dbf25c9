"""Handler choice and rerouting: which handler each changed module gets in a sampling run, and where the weak
evaluation runs.

Once the model is loaded, and before the first step, each changed module gets its handler
(``handlers.py``), chosen from how ``guidance.layers`` places its parameters and how ComfyUI
holds its weights (``host.py``), and the route is decided: the weak null evaluation batched
with the fine-tuned ones as CFG batches cond and uncond (rows), or in a forward of its own
where some change cannot be guided row by row. The log says which and why.

A forward with weak rows may find the route wrong: a layer that sees another number of
rows than the batch, or a changed layer that ComfyUI did not call but whose weights it read
(a fused kernel). It raises ``Reroute``; the run moves the weak evaluation to a forward of its
own, with other handlers where needed, and the step's evaluations are made again. Never a
guess: where no route is exact, the run stops with the reason.
"""

from __future__ import annotations

import logging

import torch

from ...guidance import GuidanceInputError, LayerDelta, Placement
from . import host
from .handlers import (
    Correction,
    Handler,
    ReadBoth,
    RowMixing,
    Scratch,
    Swap,
    WeakWeights,
    WeightFunction,
)
from .pairs import FinetunedPair, LazyDelta
from .rows import RowLayoutChanged, RowState
from .vocabulary import GuidanceConfig, Route, RowOmegasUnavailable
from .weak_weights import WeakWorkspace, mostly_not_own, parameter_names, single_dense

log = logging.getLogger(__name__)


class ReadWatch:
    """For one forward: which comfy.ops layers had their weights read through ``cast_bias_weight`` outside their own
    call (a fused kernel that reads the weights and skips the layer), found with a pass-through ``weight_function``.
    """

    def __init__(self, layers: dict[str, torch.nn.Module]):
        self.layers = {path: layer for path, layer in layers.items() if host.honours_weight_function(layer)}
        # Layers that read their weights in their own call only (packed GGUF): not called means not used.
        self.in_call_only = {path for path, layer in layers.items() if host.reads_weights_in_call_only(layer)}
        self.inside: set[str] = set()
        self.outside: set[str] = set()
        self.saved: dict[str, dict] = {}
        self.handles: list = []

    def __enter__(self) -> ReadWatch:
        for path, layer in self.layers.items():
            def seen(weight, path=path):
                if path not in self.inside:
                    self.outside.add(path)
                return weight
            seen.pass_through = True
            self.saved[path] = host.with_weight_functions(layer, {"weight": [seen]})
            self.handles.append(layer.register_forward_pre_hook(lambda m, a, path=path: self.inside.add(path)))
            self.handles.append(layer.register_forward_hook(lambda m, a, o, path=path: self.inside.discard(path),
                                                            always_call=True))
        return self

    def __exit__(self, *exc) -> None:
        for path, saved in self.saved.items():
            host.restore_attributes(self.layers[path], saved)
        for handle in self.handles:
            handle.remove()



class Reroute(Exception):
    """Raised from a forward with weak rows: the weak evaluation moves to a forward of its own, and ``paths`` to
    handlers that do not rely on ComfyUI calling their modules. Nothing persists from the forward that raised it;
    the step's evaluations are made again."""

    def __init__(self, reason: str, paths: tuple[str, ...] = ()):
        super().__init__(reason)
        self.reason, self.paths = reason, paths


class Run:
    """One sampling run: the handlers, and which rows of the current forward are weak."""

    def __init__(self, pair: FinetunedPair, config: GuidanceConfig, weak_weights: bool, workspace: WeakWorkspace | None):
        self.pair, self.config = pair, config
        self.weak_weights = weak_weights
        self.workspace = workspace
        self.state = RowState()
        self.handlers: list[Handler] = []
        self.route: Route | None = None
        self.scratch = Scratch()
        self.watched = False  # the first forward with weak rows of these handlers has been checked
        self.root: torch.nn.Module | None = None
        self.uncalled: set[str] = set()  # modules whose weights ComfyUI may read without calling them
        self.prefer_own = False  # the weak evaluation in a forward of its own even where rows would do (prepare)
        self.patcher = None  # the MODEL being sampled (prepare)

    # Choosing handlers, once the model is loaded.
    def prepare(self, root: torch.nn.Module, route: Route | None = None, patcher=None) -> None:
        """Give each changed module its handler and decide the route (module docstring). ``patcher``: the MODEL
        being sampled (it may carry more patches than the pair's fine-tuned MODEL)."""
        self.root = root
        self.patcher = patcher or self.patcher
        pair = self.pair
        # A full fine-tune whose layers mostly do not compute with their own parameters (streamed by dynamic VRAM,
        # quantized, patched on the fly): ComfyUI's weight function in a forward of its own costs a pass over the
        # weights, where a correction would pass the weak rows through every layer twice.
        self.prefer_own = route == Route.OWN_FORWARD or self.config.route == Route.OWN_FORWARD or (
            self.weak_weights and self.config.rows is None and mostly_not_own(pair, root))
        handlers: list[Handler] = []
        reasons: list[str] = []
        factors = self.config.weak.factors  # omega per block: empty when off
        for path, deltas in pair.deltas.items():
            factor = factors.get(path, 1.0)
            if factor == 0.0:
                continue  # the block keeps the fine-tuned weights: the weak model is the fine-tuned one there
            module = root.get_submodule(path)
            places = [pair.placements[f"{path}.{name}"] for name in parameter_names(deltas)]
            why = next((p.reason for p in places if p.reason), "")
            layer = all(p.kind is not None for p in places) and not why
            handlers.append(self._handler(path, module, deltas, layer))
            if factor != 1.0:
                handlers[-1].factor = factor
            if why:
                reasons.append(why)
        containers = sorted({p.container for p in pair.placements.values() if p.placement == Placement.IN_ROW_MIXING})
        for container in containers:
            inner = [h for h in handlers if h.path.startswith(container + ".")]
            if inner:
                handlers.append(RowMixing(container, root.get_submodule(container), self.state, inner))
        in_mixing = {id(h) for h in handlers if any(h.path.startswith(c + ".") for c in containers)}
        needs_own = [h for h in handlers if not h.row_capable and id(h) not in in_mixing]
        route = route or self.config.route or (Route.OWN_FORWARD if needs_own or self.prefer_own else Route.ROWS)
        if route == Route.ROWS and needs_own:
            raise GuidanceInputError(f"Personalization guidance: {needs_own[0].path} needs a weak forward of its own.")
        if self.config.rows is not None:
            blocked = next((h for h in handlers if not h.per_row_omega), None)
            if blocked is not None:
                raise RowOmegasUnavailable(blocked.path)
        self.route, self.handlers, self.watched = route, handlers, False
        self.scratch.size = max((sum(t.numel() for t in h.delta.tensors()) for h in handlers
                                 if isinstance(h, WeakWeights) and h.slots is None), default=0)
        for handler in handlers:
            handler.install()
        counts: dict[str, int] = {}
        for handler in handlers:
            counts[type(handler).__name__] = counts.get(type(handler).__name__, 0) + 1
        because = f" ({reasons[0]}{'; and others' if len(reasons) > 1 else ''})" if route == Route.OWN_FORWARD and reasons else ""
        log.info("Personalization guidance: the weak evaluation runs in %s%s; handlers: %s.", route.value, because,
                 ", ".join(f"{k} x {n}" for k, n in sorted(counts.items())))
        if factors:
            scaled = sorted({f for f in factors.values() if f not in (0.0, 1.0)})
            log.info("Personalization guidance, omega per block (%s): %d changed module(s) at the run's omega, %d "
                     "scaled (factors %s), %d keep the fine-tuned weights (factor 0).", self.config.weak.blocks.label(),
                     sum(f == 1.0 for f in factors.values()), sum(f not in (0.0, 1.0) for f in factors.values()),
                     ", ".join(f"{f:g}" for f in scaled) or "none", sum(f == 0.0 for f in factors.values()))

    def _handler(self, path: str, module: torch.nn.Module, deltas: list[LayerDelta], layer: bool) -> Handler:
        """The handler of one changed module (module docstring of ``handlers.py``).

        Layer kinds: weak weights for a full fine-tune's layer that computes with its own parameters, and
        ComfyUI's weight function for one that does not (streamed, patched on the fly) where the weak evaluation
        has a forward of its own; the correction for LoRA factors, small deltas and per-row omegas, and where
        ComfyUI patches the weights on the fly in a batched forward. ComfyUI's weight function also serves a
        comfy.ops layer whose weights may be read without calling it. Everything else: the module holds weak
        values through a weak forward of its own.
        """
        state = self.state
        lazy = next((d for d in deltas if isinstance(d, LazyDelta)), None)
        if lazy is not None:
            if path in self.uncalled or "forward" in module.__dict__:
                why = ("ComfyUI reads its weights without calling it" if path in self.uncalled else
                       "something replaced its forward (a LoRA in bypass mode)")
                raise GuidanceInputError(f"Personalization guidance cannot apply the weak model exactly to {path}: "
                                         f"{why}, and the pair reads its weights from two models as the layer runs.")
            keys = [f"{path}.{name}" for name in lazy.names]
            same = self.patcher is None or all(self.patcher.patches.get(k, []) == lazy.finetuned.patches.get(k, [])
                                               for k in keys)
            return ReadBoth(path, module, state, lazy, same)
        dense = single_dense(deltas)
        uncalled = path in self.uncalled
        full = dense is not None and self.weak_weights and self.config.rows is None
        if layer and not uncalled:
            if full and host.computes_with_own_parameters(module):
                slots = None if self.workspace is None else self.workspace.layers.get(path)
                if slots is not None and any(module._parameters[n].device != s.device or module._parameters[n].dtype != s.dtype
                                             for n, s in slots.items()):
                    slots = None  # the workspace landed elsewhere (a partial load): form just in time
                return WeakWeights(path, module, state, dense, slots, self.scratch)
            if full and self.prefer_own and host.honours_weight_function(module):
                return WeightFunction(path, module, state, dense)
            return Correction(path, module, state, deltas)
        if dense is not None and layer and host.honours_weight_function(module):
            return WeightFunction(path, module, state, dense)
        if host.reads_weights_in_call_only(module):
            raise GuidanceInputError(f"Personalization guidance cannot apply the weak model exactly to {path}: its "
                                     "GGUF weights cannot take this kind of change.")
        if dense is None:
            raise GuidanceInputError(f"Personalization guidance cannot apply LoRA factors to {path} without calling it.")
        return Swap(path, module, state, dict(dense.params))

    def reroute(self, change: Reroute) -> None:
        """Move the weak evaluation to a forward of its own (``Reroute``), with new handlers where needed."""
        if self.config.rows is not None:
            raise RowOmegasUnavailable(change.paths[0] if change.paths else change.reason)
        if self.config.route == Route.ROWS or (self.route == Route.OWN_FORWARD and not set(change.paths) - self.uncalled):
            raise GuidanceInputError(f"Personalization guidance cannot apply the weak model exactly: {change.reason}.")
        log.info("Personalization guidance: %s; the weak evaluation moves to a forward of its own.", change.reason)
        self.close()
        self.uncalled |= set(change.paths)
        self.prepare(self.root, Route.OWN_FORWARD)

    def close(self) -> None:
        for handler in self.handlers:
            handler.remove()
        self.handlers = []
        self.scratch.clear()

    # Each forward.
    def form_workspace(self) -> None:
        """The workspace's weak weights for the current omega (``WeakWorkspace.form``)."""
        users = [h for h in self.handlers if isinstance(h, WeakWeights) and h.slots is not None]
        if users and not self.state.inactive:
            self.workspace.form(users, self.state.coefficient, self.root)

    def forward(self, executor, args, kwargs):
        """One model forward with weak rows (``state.rows`` set): the handlers' hooks run inside it. The first one
        also checks that ComfyUI called every module whose handler relies on it (``ReadWatch``)."""
        if self.state.inactive:
            return executor(*args, **kwargs)
        self.form_workspace()
        try:
            for handler in self.handlers:
                handler.begin_forward()
            if self.watched:
                return executor(*args, **kwargs)
            self.state.ran.clear()
            with ReadWatch({h.path: h.module for h in self.handlers if h.relies_on_call}) as watch:
                out = executor(*args, **kwargs)
            self._check_first_forward(watch)
            self.watched = True
            return out
        except RowLayoutChanged as changed:
            raise Reroute(f"{changed}, so its rows cannot be told apart") from None
        finally:
            for handler in self.handlers:
                handler.end_forward()

    def _check_first_forward(self, watch: ReadWatch) -> None:
        """Every handler that relies on ComfyUI calling its module: called, or its weights not read at all."""
        missed = [h for h in self.handlers if h.relies_on_call and id(h) not in self.state.ran]
        fused = [h.path for h in missed if h.path in watch.outside]
        known = watch.layers.keys() | watch.in_call_only
        unknown = [h.path for h in missed if h.path not in known and not isinstance(h, RowMixing)]
        if fused or unknown:
            paths = tuple(fused + unknown)
            how = ("ComfyUI reads their weights without calling them (a fused kernel)" if fused else
                   "ComfyUI did not call them, and may read their weights another way")
            raise Reroute(f"{len(paths)} changed layer(s) ({', '.join(paths[:3])}) were not called in the weak "
                           f"evaluation: {how}", paths)
        unused = [h.path for h in missed if h.path in known]
        if unused:
            log.info("Personalization guidance: %d changed layer(s) take no part in this model's forward (first: "
                     "%s); their change has no effect on the fine-tuned or the weak model.", len(unused), unused[0])

