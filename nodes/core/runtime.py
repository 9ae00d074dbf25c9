"""Personalization guidance inside ComfyUI's sampling: one core for the GUIDER and the KSampler route.

``attach`` returns a clone of the fine-tuned MODEL carrying four wrappers:

- OUTER_SAMPLE: for the length of one sampling run, the per-layer machinery of
  ``layers.py`` on the modules that the personalization changed. Undone in ``finally``,
  so an interrupted or failed run leaves the model as it was. A model that ComfyUI
  would run on several GPUs is refused here, before anything loads.
- SAMPLER_SAMPLE: once the model is loaded, and before the first step, each changed
  module gets its handler, chosen from how ``guidance.layers`` places its parameters
  and how ComfyUI holds its weights (``host.py``), and the route is decided:
  the weak null evaluation batched with the fine-tuned ones as CFG batches cond and
  uncond (rows), or in a forward of its own where some change cannot be guided row by
  row. The log says which and why.
- PREDICT_NOISE: replaces CFG's combination with the estimate of SPEC.md. ComfyUI's
  pre- and post-CFG hooks are replayed, seeing the weak null prediction as "uncond".
- APPLY_MODEL: tells the handlers which rows of the batch are the weak model's
  (``transformer_options["cond_or_uncond"]``), and after the first forward with weak
  rows checks that ComfyUI called every module whose handler relies on it.

Weak weights (full fine-tunes, where a correction would pass the weak rows through
every layer twice) are formed once per omega in a workspace that loads with the model,
where omega is flat and the device has room for it next to the model; otherwise each
layer forms them just in time in a scratch buffer the size of the largest layer. Two
weight sets either way (SPEC.md): theta_ft and theta_w on the device and the delta in
system memory, or theta_ft and the delta.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from enum import Enum

import torch

import comfy.model_management
import comfy.model_patcher
import comfy.patcher_extension
import comfy.sampler_helpers
import comfy.samplers

from ...guidance import (
    DenseDelta,
    GuidanceInputError,
    LayerDelta,
    LowRankDelta,
    OmegaSchedule,
    Placement,
    check_scale,
    combine,
    omega_at_sigma,
    plan_evaluations,
    plan_for_rows,
    progress_of_sigma,
    weak_parameter,
)
from . import host
from .layers import (
    ALL,
    Correction,
    Handler,
    ReadWatch,
    RowLayoutChanged,
    RowMixing,
    RowState,
    Scratch,
    Swap,
    WeakWeights,
    WeightFunction,
)
from .pairs import FinetunedPair

log = logging.getLogger(__name__)

WRAPPER_KEY = "personalization_guidance"
# The conds key under which the null conditioning rides along with positive and negative.
NULL_KEY = "pg_null"
# Index of each evaluation in the list handed to calc_cond_batch. The weak null evaluation takes
# CFG's uncond slot (1), so pre-CFG hooks and attention patches that look for "uncond" find it.
FT_POSITIVE, WEAK_NULL, FT_NEGATIVE = 0, 1, 2


class Estimate(str, Enum):
    TWO_WAY = "two-way (paper)"
    THREE_WAY = "three-way"


class Route(str, Enum):
    """Where the weak null evaluation runs."""

    ROWS = "rows of the batched forward"  # with the fine-tuned evaluations, as CFG batches uncond with cond
    OWN_FORWARD = "a forward of its own"


@dataclass(frozen=True)
class WeakModel:
    """What the Weak Model Interpolator outputs: the pair and omega over the run."""

    pair: FinetunedPair
    schedule: OmegaSchedule


@dataclass(frozen=True)
class RowScales:
    """Per-row omega and scales, for combinations sampled as rows of one latent batch (PG Sweep).

    One value per row of the latent batch; None keeps the config's value. Omega is
    constant over the run for each row.
    """

    omega: tuple[float, ...]
    lambda_t: tuple[float, ...] | None = None
    lambda_p: tuple[float, ...] | None = None


@dataclass(frozen=True)
class GuidanceConfig:
    """Everything the runtime needs besides the conds and the sampler's cfg.

    The sampler's cfg is lambda (two-way) or lambda_t (three-way); ``lambda_p`` is
    the three-way personalization scale. The weak model sees ``null`` when given,
    else the sampler's negative, which then is also the three-way's n.
    """

    weak: WeakModel
    estimate: Estimate = Estimate.TWO_WAY
    lambda_p: float = 1.0
    # The null conditioning, when it is not the sampler's negative (three-way with a negative prompt).
    null: list | None = None
    # Per-row values (the schedule and scales above are then unused where these are given).
    rows: RowScales | None = None
    # The route, when a test or benchmark wants one; None chooses (see the module docstring).
    route: Route | None = None


def _same_conditioning(conditioning: list, converted: list | None) -> bool:
    """True when ``converted`` (a guider's converted conds) was made from the very same CONDITIONING.

    In a graph that wires one empty-prompt encode to both the sampler's negative and
    null_conditioning, n is null: the cheaper evaluation plan then applies.
    """
    if converted is None or len(conditioning) != len(converted):
        return False
    for (tensor, extra), entry in zip(conditioning, converted):
        if entry.get("cross_attn") is not tensor or any(entry.get(k) is not v for k, v in extra.items()):
            return False
    return True


class WeakWorkspace(torch.nn.Module):
    """Room for the weak parameters of the layers that run their weak rows with weak weights.

    Like the pair's DeltaWeights, a module of frozen parameters that ComfyUI loads,
    as an additional model, with the fine-tuned model and within its memory budget.
    ``layers`` maps a layer path to its parameter names and the tensors they get.
    """

    def __init__(self, shapes: dict[str, dict[str, torch.Tensor]], device: torch.device):
        super().__init__()
        # What the slots hold weak parameters for: (omega - 1, the loaded weights' patches uuid, the layers formed).
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


def _single_dense(deltas: list[LayerDelta]) -> DenseDelta | None:
    """The module's delta when it is one dense delta, else None."""
    return deltas[0] if len(deltas) == 1 and isinstance(deltas[0], DenseDelta) and deltas[0].tensors() else None


def _parameter_names(deltas: list[LayerDelta]) -> list[str]:
    """The parameters a module's deltas change (LoRA factors change its weight)."""
    names = ["weight"] if any(isinstance(d, LowRankDelta) for d in deltas) else []
    return list(dict.fromkeys(names + [n for d in deltas if isinstance(d, DenseDelta) for n in d.params]))


def _plain_layer_delta(pair: FinetunedPair, path: str, deltas: list[LayerDelta]) -> DenseDelta | None:
    """A dense delta on a layer kind's own parameters: weak weights can take it."""
    dense = _single_dense(deltas)
    if dense is None:
        return None
    places = [pair.placements[f"{path}.{name}"] for name in dense.params]
    return dense if all(p.kind is not None and not p.reason for p in places) else None


def _mostly_not_own(pair: FinetunedPair, root: torch.nn.Module) -> bool:
    """True when most of a full pair's dense delta sits on comfy.ops layers that do not compute with their own
    parameters as they are (``host.computes_with_own_parameters``)."""
    own = other = 0
    for path, deltas in pair.deltas.items():
        dense = _plain_layer_delta(pair, path, deltas)
        if dense is None:
            continue
        module, size = root.get_submodule(path), sum(t.numel() for t in dense.tensors())
        if host.casts_through_comfy(module) and not host.computes_with_own_parameters(module):
            other += size
        else:
            own += size
    return other > own


class _Reroute(Exception):
    """Raised from a forward with weak rows: the weak evaluation moves to a forward of its own, and ``paths`` to
    handlers that do not rely on ComfyUI calling their modules. Nothing persists from the forward that raised it;
    the step's evaluations are made again."""

    def __init__(self, reason: str, paths: tuple[str, ...] = ()):
        super().__init__(reason)
        self.reason, self.paths = reason, paths


class _Run:
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

    # Choosing handlers, once the model is loaded.
    def prepare(self, root: torch.nn.Module, route: Route | None = None) -> None:
        """Give each changed module its handler and decide the route (module docstring)."""
        self.root = root
        pair = self.pair
        # A full fine-tune whose layers mostly do not compute with their own parameters (streamed by dynamic VRAM,
        # quantized, patched on the fly): ComfyUI's weight function in a forward of its own costs a pass over the
        # weights, where a correction would pass the weak rows through every layer twice.
        self.prefer_own = route == Route.OWN_FORWARD or self.config.route == Route.OWN_FORWARD or (
            self.weak_weights and self.config.rows is None and _mostly_not_own(pair, root))
        handlers: list[Handler] = []
        reasons: list[str] = []
        for path, deltas in pair.deltas.items():
            module = root.get_submodule(path)
            places = [pair.placements[f"{path}.{name}"] for name in _parameter_names(deltas)]
            why = next((p.reason for p in places if p.reason), "")
            layer = all(p.kind is not None for p in places) and not why
            handlers.append(self._handler(path, module, deltas, layer))
            if why:
                reasons.append(why)
        containers = sorted({p.container for p in pair.placements.values() if p.placement == Placement.IN_ROW_MIXING})
        for container in containers:
            inner = [h for h in handlers if h.path.startswith(container + ".")]
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

    def _handler(self, path: str, module: torch.nn.Module, deltas: list[LayerDelta], layer: bool) -> Handler:
        """The handler of one changed module (module docstring of ``layers.py``).

        Layer kinds: weak weights for a full fine-tune's layer that computes with its own parameters, and
        ComfyUI's weight function for one that does not (streamed, patched on the fly) where the weak evaluation
        has a forward of its own; the correction for LoRA factors, small deltas and per-row omegas, and where
        ComfyUI patches the weights on the fly in a batched forward. ComfyUI's weight function also serves a
        comfy.ops layer whose weights may be read without calling it. Everything else: the module holds weak
        values through a weak forward of its own.
        """
        state = self.state
        dense = _single_dense(deltas)
        uncalled = path in self.uncalled
        full = dense is not None and self.weak_weights and self.config.rows is None
        if layer and not uncalled:
            if full and host.computes_with_own_parameters(module):
                slots = None if self.workspace is None else self.workspace.layers.get(path)
                if slots is not None and any(module._parameters[n].device != s.device or module._parameters[n].dtype != s.dtype
                                             for n, s in slots.items()):
                    slots = None  # the workspace landed elsewhere (a partial load): form just in time
                return WeakWeights(path, module, state, dense, slots, self.scratch)
            if full and self.prefer_own and host.casts_through_comfy(module):
                return WeightFunction(path, module, state, dense)
            return Correction(path, module, state, deltas)
        if dense is not None and layer and host.casts_through_comfy(module):
            return WeightFunction(path, module, state, dense)
        if dense is None:
            raise GuidanceInputError(f"Personalization guidance cannot apply LoRA factors to {path} without calling it.")
        return Swap(path, module, state, dict(dense.params))

    def reroute(self, change: _Reroute) -> None:
        """Move the weak evaluation to a forward of its own (``_Reroute``), with new handlers where needed."""
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
    @torch.no_grad()
    def form_workspace(self) -> None:
        """The workspace's weak weights for the current omega, unless it already holds them (same omega, same
        loaded weights, same layers: e.g. the next run with a constant omega)."""
        users = [h for h in self.handlers if isinstance(h, WeakWeights) and h.slots is not None]
        if not users or self.state.inactive:
            return
        loaded = getattr(self.root, "current_weight_patches_uuid", None)
        patcher = getattr(self.root, "current_patcher", None)
        if patcher is not None and patcher.hook_patches:
            loaded = None  # hooks on the conditioning may patch weights during the run: form every time
        key = (self.state.coefficient, loaded, tuple(h.path for h in users))
        if loaded is None or self.workspace.formed_for != key:
            self.workspace.formed_for = None  # an interrupted forming leaves nothing to trust
            for handler in users:
                for name, slot in handler.slots.items():
                    weak_parameter(handler.module._parameters[name], handler.delta.params[name], self.state.coefficient,
                                   out=slot.data)
            self.workspace.formed_for = key

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
            raise _Reroute(f"{changed}, so its rows cannot be told apart") from None
        finally:
            for handler in self.handlers:
                handler.end_forward()

    def _check_first_forward(self, watch: ReadWatch) -> None:
        """Every handler that relies on ComfyUI calling its module: called, or its weights not read at all."""
        missed = [h for h in self.handlers if h.relies_on_call and id(h) not in self.state.ran]
        fused = [h.path for h in missed if h.path in watch.outside]
        unknown = [h.path for h in missed if h.path not in watch.layers and not isinstance(h, RowMixing)]
        if fused or unknown:
            paths = tuple(fused + unknown)
            how = ("ComfyUI reads their weights without calling them (a fused kernel)" if fused else
                   "ComfyUI did not call them, and may read their weights another way")
            raise _Reroute(f"{len(paths)} changed layer(s) ({', '.join(paths[:3])}) were not called in the weak "
                           f"evaluation: {how}", paths)
        unused = [h.path for h in missed if h.path in watch.layers]
        if unused:
            log.info("Personalization guidance: %d changed layer(s) take no part in this model's forward (first: "
                     "%s); their change has no effect on the fine-tuned or the weak model.", len(unused), unused[0])


class RowOmegasUnavailable(GuidanceInputError):
    """One omega per latent row (PG Sweep's batched combinations) cannot be served for this model and pair."""

    def __init__(self, where: str):
        super().__init__(f"Personalization guidance cannot give each row its own omega here ({where}): sample the "
                         "combinations one after another.")


class _Runtime:
    """The wrappers of one attached MODEL. Holds the config, and the current run while sampling."""

    def __init__(self, config: GuidanceConfig, weak_weights: bool, workspace: WeakWorkspace | None):
        self.config = config
        self.weak_weights = weak_weights
        self.workspace = workspace
        self.run: _Run | None = None
        self._progress_cache: dict[float, float] = {}
        self._progress_sampling = None

    # OUTER_SAMPLE
    def outer_sample(self, executor, *args, **kwargs):
        guider = executor.class_obj
        if self.run is not None:
            raise GuidanceInputError("Personalization guidance is already sampling with this model.")
        if host.uses_multiple_gpus(guider.model_patcher):
            raise GuidanceInputError(
                "Personalization guidance cannot run on several GPUs (MultiGPU work units): ComfyUI would run some "
                "evaluations on copies of the model that the guidance does not reach. Remove the MultiGPU node, or "
                "sample on one GPU."
            )
        null = self.config.null
        if null is not None and not _same_conditioning(null, guider.original_conds.get("negative")):
            guider.conds[NULL_KEY] = comfy.sampler_helpers.convert_cond(null)
        self.run = _Run(self.config.weak.pair, self.config, self.weak_weights, self.workspace)
        try:
            return executor(*args, **kwargs)
        finally:
            self.run.close()
            self.run = None

    # SAMPLER_SAMPLE: the model is loaded, no step has run.
    def sampler_sample(self, executor, guider, *args, **kwargs):
        if self.run is not None and self.run.route is None:
            self.run.prepare(guider.model_patcher.model)
        return executor(guider, *args, **kwargs)

    # APPLY_MODEL
    def apply_model(self, executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):
        run = self.run
        chunks = transformer_options.get("cond_or_uncond", [])
        weak = [i for i, which in enumerate(chunks) if which == WEAK_NULL]
        args = (x, t, c_concat, c_crossattn, control, transformer_options)
        if run is None or run.route is None or not weak:
            return executor(*args, **kwargs)
        state = run.state
        per_chunk = x.shape[0] // len(chunks)
        if isinstance(state.coefficient, torch.Tensor) and state.coefficient.shape[0] != per_chunk:
            raise GuidanceInputError("Personalization guidance: per-row omega values do not match the batch.")
        if len(weak) == len(chunks):
            state.rows = ALL
        elif run.route == Route.OWN_FORWARD:
            raise GuidanceInputError("Personalization guidance: a weak evaluation meant for a forward of its own was "
                                     "batched with others.")
        else:
            state.rows = [slice(i * per_chunk, (i + 1) * per_chunk) for i in weak]
        state.batch = x.shape[0]
        try:
            return run.forward(executor, args, kwargs)
        finally:
            state.rows = None

    def progress(self, model_sampling, sigma: float) -> float:
        # Progress depends on the sigma and the model's sampling alone: kept across runs (a bisection costs ~1 ms).
        if self._progress_sampling is not model_sampling or len(self._progress_cache) > 4096:
            self._progress_sampling, self._progress_cache = model_sampling, {}
        p = self._progress_cache.get(sigma)
        if p is None:
            p = self._progress_cache[sigma] = progress_of_sigma(model_sampling.percent_to_sigma, sigma)
        return p

    def omega(self, model, timestep: torch.Tensor) -> float:
        schedule = self.config.weak.schedule
        if schedule.is_constant:
            return schedule.omega_start
        sampling = model.model_sampling
        return omega_at_sigma(schedule, float(timestep.flatten()[0]), sampling.percent_to_sigma,
                              lambda sigma: self.progress(sampling, sigma))

    def evaluate(self, model, batch: list, x, timestep, model_options, coefficient) -> list[torch.Tensor]:
        """The evaluations of ``batch`` through ComfyUI's calc_cond_batch: batched as CFG batches them, the weak
        null evaluation in a forward of its own where the route says so. A forward that finds the route wrong
        (``_Reroute``) changes it, and the step's evaluations are made again."""
        run = self.run
        if run is None:
            return comfy.samplers.calc_cond_batch(model, batch, x, timestep, model_options)
        run.state.coefficient = coefficient
        for _ in range(3):  # at most: rows -> a forward of its own -> layers not called get other handlers
            try:
                if run.route == Route.OWN_FORWARD and batch[WEAK_NULL] is not None:
                    out = comfy.samplers.calc_cond_batch(model, [batch[FT_POSITIVE], None, batch[FT_NEGATIVE]], x,
                                                         timestep, model_options)
                    weak = comfy.samplers.calc_cond_batch(model, [None, batch[WEAK_NULL]], x, timestep, model_options)
                    out[WEAK_NULL] = weak[WEAK_NULL]
                    return out
                return comfy.samplers.calc_cond_batch(model, batch, x, timestep, model_options)
            except _Reroute as change:
                run.reroute(change)
        raise GuidanceInputError("Personalization guidance could not settle on a route for this model.")

    # PREDICT_NOISE
    def predict_noise(self, executor, x, timestep, model_options={}, seed=None):
        guider = executor.class_obj
        model = guider.inner_model
        conds = guider.conds
        lambda_t = guider.cfg
        three_way = self.config.estimate == Estimate.THREE_WAY
        lambda_p = self.config.lambda_p if three_way else lambda_t
        positive, negative = conds.get("positive"), conds.get("negative")
        null = conds.get(NULL_KEY, negative)
        negative_is_null = NULL_KEY not in conds
        rows = self.config.rows
        if rows is None:
            omega = self.omega(model, timestep)
            evaluations = plan_evaluations(lambda_p, lambda_t, omega, negative_is_null)
            coefficient = omega - 1.0
        else:
            # One batch, one omega and scale per row.
            n = len(rows.omega)
            lambdas_t = rows.lambda_t or (lambda_t,) * n
            lambdas_p = (rows.lambda_p or (lambda_p,) * n) if three_way else lambdas_t
            evaluations = plan_for_rows(lambdas_p, lambdas_t, rows.omega, negative_is_null)
            coefficient = torch.tensor(rows.omega, device=x.device, dtype=torch.float32) - 1.0
            lambda_t, lambda_p = (torch.tensor(v, device=x.device, dtype=x.dtype).view(-1, *[1] * (x.dim() - 1))
                                  for v in (lambdas_t, lambdas_p))
        if model_options.get("disable_cfg1_optimization", False) and not evaluations.weak_null:
            evaluations = dataclasses.replace(evaluations, weak_null=True)
        batch = [None, None, None]
        if evaluations.ft_positive:
            batch[FT_POSITIVE] = positive
        if evaluations.weak_null:
            batch[WEAK_NULL] = null
        if evaluations.ft_negative:
            batch[FT_NEGATIVE] = negative
        out = self.evaluate(model, batch, x, timestep, model_options, coefficient)
        for fn in model_options.get("sampler_pre_cfg_function", []):
            out = fn({"conds": batch, "conds_out": out, "cond_scale": lambda_t, "timestep": timestep, "input": x,
                      "sigma": timestep, "model": model, "model_options": model_options})
        if not three_way:
            # Two-way is CFG with the weak null prediction as uncond, so ComfyUI's own cfg_function computes it
            # (in the order of guidance.two_way, bit for bit) and runs custom CFG functions and post-CFG hooks.
            # A skipped weak evaluation (lambda = 1) is zeros there, as for CFG at scale 1.
            return comfy.samplers.cfg_function(model, out[FT_POSITIVE], out[WEAK_NULL], lambda_t, x, timestep,
                                               model_options=model_options, cond=positive, uncond=batch[WEAK_NULL])
        d_c, d_w, d_n = (o if c is not None else None for o, c in zip(out, batch))
        result = combine(evaluations, d_c, d_n, d_w, lambda_p, lambda_t)
        uncond_denoised = d_w if d_w is not None else d_n if d_n is not None else out[WEAK_NULL]
        for fn in model_options.get("sampler_post_cfg_function", []):
            result = fn({"denoised": result, "cond": positive, "uncond": batch[WEAK_NULL], "cond_scale": lambda_t,
                         "model": model, "uncond_denoised": uncond_denoised, "cond_denoised": out[FT_POSITIVE],
                         "sigma": timestep, "model_options": model_options, "input": x})
        return result


# Weak weights pay when the dense deltas cover at least this fraction of the diffusion model's parameters.
SPLIT_FRACTION = 0.5


def _prefers_weak_weights(model: comfy.model_patcher.ModelPatcher, pair: FinetunedPair) -> bool:
    """True when weak weights are the cheaper way for this pair (a full fine-tune): see the module docstring."""
    dense = sum(t.numel() for path, deltas in pair.deltas.items()
                if (d := _plain_layer_delta(pair, path, deltas)) is not None for t in d.tensors())
    return dense >= SPLIT_FRACTION * sum(p.numel() for p in model.model.diffusion_model.parameters())


def _workspace_fits(model: comfy.model_patcher.ModelPatcher, nbytes: int) -> bool:
    """Weak weights formed once take a second weight set on the device. Only where the device is not the system
    memory that also holds the delta (SPEC.md: two weight sets), ComfyUI holds weights as they are (not streamed,
    not cast from another dtype), and the model with the workspace fits in the device's memory."""
    device = model.load_device
    if device.type == "cpu" or host.is_dynamic(model) or getattr(model.model, "manual_cast_dtype", None) is not None:
        return False
    total = comfy.model_management.get_total_memory(device)
    return model.model_size() + nbytes + comfy.model_management.minimum_inference_memory() < total


def _workspace(model: comfy.model_patcher.ModelPatcher, pair: FinetunedPair) -> comfy.model_patcher.ModelPatcher | None:
    """The pair's workspace for weak weights formed once, or None where it does not pay (``_workspace_fits``).
    Made on first use and shared by every guider of the pair (a sweep makes many; ComfyUI runs one sampling at a
    time), so that it is allocated and loaded once."""
    if pair.workspace is None:
        shapes = {}
        for path, deltas in pair.deltas.items():
            dense = _plain_layer_delta(pair, path, deltas)
            if dense is not None:
                layer = model.model.get_submodule(path)
                shapes[path] = {name: layer._parameters[name] for name in dense.params}
        nbytes = sum(t.numel() * t.element_size() for params in shapes.values() for t in params.values())
        if not _workspace_fits(model, nbytes):
            return None
        pair.workspace = comfy.model_patcher.ModelPatcher(WeakWorkspace(shapes, model.offload_device),
                                                          load_device=model.load_device, offload_device=model.offload_device)
    return pair.workspace


def attach(model: comfy.model_patcher.ModelPatcher, config: GuidanceConfig) -> comfy.model_patcher.ModelPatcher:
    """A clone of ``model`` that samples with personalization guidance (see the module docstring)."""
    pair = config.weak.pair
    pair.check_model(model)
    if config.estimate == Estimate.THREE_WAY:
        check_scale("personalization_scale", config.lambda_p)
    if model.get_wrappers(comfy.patcher_extension.WrappersMP.PREDICT_NOISE, WRAPPER_KEY):
        raise GuidanceInputError("This MODEL already has personalization guidance: apply it once.")
    patched = model.clone()
    # Per-row omegas (PG Sweep) take the correction: a layer runs its weak rows with one set of weak weights.
    weak_weights = config.rows is None and _prefers_weak_weights(patched, pair)
    # What the run needs loads with the model, in the same load_models_gpu call, within ComfyUI's memory budget:
    # the weak weights formed once where omega takes one value and there is room, else the delta.
    workspace = _workspace(patched, pair) if weak_weights and config.weak.schedule.is_flat else None
    patched.set_additional_models(WRAPPER_KEY, [pair.delta_patcher if workspace is None else workspace])
    runtime = _Runtime(config, weak_weights, None if workspace is None else workspace.model)
    for kind, function in ((comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, runtime.outer_sample),
                           (comfy.patcher_extension.WrappersMP.SAMPLER_SAMPLE, runtime.sampler_sample),
                           (comfy.patcher_extension.WrappersMP.PREDICT_NOISE, runtime.predict_noise),
                           (comfy.patcher_extension.WrappersMP.APPLY_MODEL, runtime.apply_model)):
        patched.add_wrapper_with_key(kind, WRAPPER_KEY, function)
    return patched


__all__ = ["Estimate", "GuidanceConfig", "NULL_KEY", "Route", "RowOmegasUnavailable", "RowScales", "WeakModel", "attach"]
