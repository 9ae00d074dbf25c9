"""Personalization guidance inside ComfyUI's sampling: one core for the GUIDER and the KSampler route.

``attach`` returns a clone of the fine-tuned MODEL carrying three wrappers:

- OUTER_SAMPLE: for the length of one sampling run, the per-layer machinery below on
  the layers that the personalization changed. Undone in ``finally``, so an
  interrupted or failed run leaves the model as it was.
- PREDICT_NOISE: replaces CFG's combination with the estimate of SPEC.md. ComfyUI's
  pre- and post-CFG hooks are replayed, seeing the weak null prediction as "uncond".
- APPLY_MODEL: tells the layers which rows of the batch are the weak model's
  (``transformer_options["cond_or_uncond"]``).

The evaluations go through one ``calc_cond_batch`` call, batched exactly as CFG's
cond and uncond. The weak rows of each changed layer compute theta_pre + omega * delta
= theta_ft + (omega - 1) * delta in one of two exact ways (``guidance.deltas``):

- Correction (LoRA pairs, and any pair that changes few weights): a forward hook adds
  ``(omega - 1) * F_delta(x)`` to the weak rows of the layer's output, in low rank for
  LoRA. One copy of the base weights.
- Weak weights (full fine-tunes, which change nearly every weight, so that a
  correction would pass the weak rows through every layer twice): the layer runs its
  fine-tuned rows with theta_ft and its weak rows with weak parameters. Where omega
  takes one value (a flat schedule) they are formed once in a workspace that stays
  loaded (theta_ft and theta_w on the device, the delta in system memory); where it
  moves, each layer forms them just in time from theta_ft and the delta in a scratch
  buffer the size of the largest layer (theta_ft and the delta on the device). Two
  weight sets either way (SPEC.md), as with two separate UNets.

Both exist only during a run: hooks are removed and layer forwards restored in
``finally``; the weights themselves are never written.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from enum import Enum

import torch

import comfy.model_patcher
import comfy.patcher_extension
import comfy.sampler_helpers
import comfy.samplers

from ...guidance import (
    DenseDelta,
    GuidanceInputError,
    LayerDelta,
    OmegaSchedule,
    check_scale,
    combine,
    omega_at,
    plan_evaluations,
    plan_for_rows,
    prepare_correction,
    rows_for_layer,
    weak_parameter,
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


def progress_of_sigma(model_sampling, sigma: float) -> float:
    """p in [0, 1] with ``model_sampling.percent_to_sigma(p) == sigma``: the inverse, by bisection.

    ``percent_to_sigma`` is decreasing for every ComfyUI model sampling, so this is
    the same progress convention that ComfyUI's timestep ranges use.
    """
    lo, hi = 0.0, 1.0
    if sigma >= model_sampling.percent_to_sigma(1e-9):
        return 0.0
    for _ in range(48):
        mid = 0.5 * (lo + hi)
        if model_sampling.percent_to_sigma(mid) > sigma:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


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


def _single_dense(deltas: list[LayerDelta]) -> bool:
    """True for a layer whose delta is one dense delta: a layer that can run its weak rows with weak weights."""
    return len(deltas) == 1 and isinstance(deltas[0], DenseDelta) and bool(deltas[0].tensors())


def _can_split(layer: torch.nn.Module, delta: DenseDelta, slots: dict[str, torch.nn.Parameter] | None) -> bool:
    """True when ``layer`` computes with its parameters as they are, so that running rows with others is exact.

    Not so when ComfyUI casts or patches them on the fly (low-VRAM loads, weight
    functions), when the workspace did not land on the layer's device, or when
    something else already replaced the layer's forward.
    """
    if getattr(layer, "comfy_cast_weights", False) or getattr(layer, "weight_function", None) or getattr(layer, "bias_function", None):
        return False
    if "forward" in layer.__dict__:
        return False
    for name in ("weight", "bias"):
        if getattr(delta, name) is None:
            continue
        param = layer._parameters.get(name)
        if param is None:
            return False
        slot = None if slots is None else slots[name]
        if slot is not None and (param.device != slot.device or param.dtype != slot.dtype or param.shape != slot.shape):
            return False
    return True


def _segments(weak: list[slice], size: int) -> list[tuple[slice, bool]]:
    """``range(size)`` cut into consecutive chunks, each marked weak or not."""
    out, at = [], 0
    for chunk in sorted(weak, key=lambda c: c.start):
        if chunk.start > at:
            out.append((slice(at, chunk.start), False))
        out.append((chunk, True))
        at = chunk.stop
    if at < size:
        out.append((slice(at, size), False))
    return out


class _Run:
    """State of one sampling run: which rows are weak in the current forward, and the per-layer machinery."""

    def __init__(self, pair: FinetunedPair, diffusion_parent: torch.nn.Module, weak_weights: bool,
                 workspace: WeakWorkspace | None):
        self.coefficient: float | torch.Tensor = 0.0  # omega - 1: one value, or one per latent row (RowScales)
        self.rows: list[slice] | None = None  # the weak chunks of the current forward's batch
        self.batch = 0
        self.handles = []
        self.parent = diffusion_parent
        self.deltas = pair.deltas
        self.workspace = workspace  # weak weights formed once (flat schedules); None: formed just in time
        self.scratch: dict[tuple, torch.Tensor] = {}  # just in time: one buffer per device and dtype
        self.scratch_size = 0
        # Weak weights: the layers that run their weak rows with them, decided on the first weak forward.
        self.weak_weights = weak_weights
        self.split: list[tuple[str, torch.nn.Module, DenseDelta]] | None = None
        for path, deltas in pair.deltas.items():
            if not (weak_weights and _single_dense(deltas)):
                self._add_hook(path, deltas)

    def _add_hook(self, path: str, deltas: list[LayerDelta]):
        layer = self.parent.get_submodule(path)
        self.handles.append(layer.register_forward_hook(self._hook(layer, deltas)))

    def close(self):
        for _, layer, _ in self.split or []:
            layer.__dict__.pop("forward", None)
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        self.scratch.clear()

    def _layer_rows(self, x: torch.Tensor, coefficient):
        """The weak rows (and per-row coefficients) as the layer sees them: some layers expand each batch row."""
        rows = self.rows
        if x.shape[0] != self.batch:
            rows = [rows_for_layer(r, self.batch, x.shape[0]) for r in rows]
            if isinstance(coefficient, torch.Tensor):
                coefficient = coefficient.repeat_interleave(x.shape[0] // self.batch)
        return rows, coefficient

    def _hook(self, layer: torch.nn.Module, deltas: list[LayerDelta]):
        prepared = []  # once per run, on the device and in the dtype the layer computes in

        def hook(module, args, out):
            if self.rows is None or (not isinstance(self.coefficient, torch.Tensor) and self.coefficient == 0.0):
                return None
            x = args[0]
            if not prepared:
                prepared.extend(prepare_correction(layer, d, x.device, x.dtype) for d in deltas)
            rows, coefficient = self._layer_rows(x, self.coefficient)
            if out.requires_grad:
                out = out.clone()
            for correction in prepared:
                for chunk in rows:
                    correction.add(x, out, chunk, coefficient)
            return out

        return hook

    # Weak weights.
    def _split_forward(self, path: str, layer: torch.nn.Module, delta: DenseDelta):
        """The layer's own forward, run on the fine-tuned rows as they are and on the weak rows with weak parameters."""
        own = type(layer).forward.__get__(layer)
        params = layer._parameters
        names = [name for name in ("weight", "bias") if getattr(delta, name) is not None]

        def forward(x, *args, **kwargs):
            if self.rows is None or self.coefficient == 0.0:
                return own(x, *args, **kwargs)
            outs = []
            for chunk, weak in _segments(self._layer_rows(x, None)[0], x.shape[0]):
                if not weak:
                    outs.append(own(x[chunk], *args, **kwargs))
                    continue
                saved = {name: params[name] for name in names}
                params.update(self.workspace.layers[path] if self.workspace is not None else self._formed(layer, delta, names))
                try:
                    outs.append(own(x[chunk], *args, **kwargs))
                finally:
                    params.update(saved)
            return outs[0] if len(outs) == 1 else torch.cat(outs)

        return forward

    @torch.no_grad()
    def _formed(self, layer: torch.nn.Module, delta: DenseDelta, names: list[str]) -> dict[str, torch.Tensor]:
        """Just in time: the layer's weak parameters for the current omega, in the run's scratch buffer."""
        like = layer._parameters[names[0]]
        key = (like.device, like.dtype)
        buffer = self.scratch.get(key)
        if buffer is None:
            buffer = self.scratch[key] = torch.empty(self.scratch_size, device=like.device, dtype=like.dtype)
        out, at = {}, 0
        for name in names:
            param = layer._parameters[name]
            slot = buffer[at:at + param.numel()].view(param.shape)
            out[name] = weak_parameter(param, getattr(delta, name), self.coefficient, out=slot)
            at += param.numel()
        return out

    def _prepare_split(self):
        """On the first weak forward (the model is loaded by then): which layers split, and hooks for the others."""
        self.split = []
        candidates = [(path, ds[0]) for path, ds in self.deltas.items() if _single_dense(ds)]
        for path, delta in candidates:
            layer = self.parent.get_submodule(path)
            if _can_split(layer, delta, None if self.workspace is None else self.workspace.layers[path]):
                self.split.append((path, layer, delta))
                layer.forward = self._split_forward(path, layer, delta)
                # Just in time, the weak parameters of one layer at a time: room for the largest.
                self.scratch_size = max(self.scratch_size, sum(t.numel() for t in delta.tensors()))
            else:
                self._add_hook(path, [delta])
        if len(self.split) < len(candidates):
            log.info("Personalization guidance: %d of %d layers are cast or patched on the fly (low VRAM) and get "
                     "the weak correction instead of weak weights.", len(candidates) - len(self.split), len(candidates))

    @torch.no_grad()
    def before_weak_forward(self):
        """Weak weights: the split on the first weak forward; the workspace formed for the current omega unless it
        already holds it (same omega, same loaded weights, same layers: e.g. the next run with a constant omega)."""
        if not self.weak_weights or self.coefficient == 0.0:
            return  # the correction only; or omega = 1: the weak model is the fine-tuned one
        if self.split is None:
            self._prepare_split()
        if self.workspace is None:
            return
        loaded = getattr(self.parent, "current_weight_patches_uuid", None)
        patcher = getattr(self.parent, "current_patcher", None)
        if patcher is not None and patcher.hook_patches:
            loaded = None  # hooks on the conditioning may patch weights during the run: form every time
        key = (self.coefficient, loaded, tuple(path for path, _, _ in self.split))
        if loaded is None or self.workspace.formed_for != key:
            self.workspace.formed_for = None  # an interrupted forming leaves nothing to trust
            for path, layer, delta in self.split:
                for name, slot in self.workspace.layers[path].items():
                    weak_parameter(layer._parameters[name], getattr(delta, name), self.coefficient, out=slot.data)
            self.workspace.formed_for = key


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
        null = self.config.null
        if null is not None and not _same_conditioning(null, guider.original_conds.get("negative")):
            guider.conds[NULL_KEY] = comfy.sampler_helpers.convert_cond(null)
        self.run = _Run(self.config.weak.pair, guider.model_patcher.model, self.weak_weights, self.workspace)
        try:
            return executor(*args, **kwargs)
        finally:
            self.run.close()
            self.run = None

    # APPLY_MODEL
    def apply_model(self, executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):
        run = self.run
        chunks = transformer_options.get("cond_or_uncond", [])
        weak = [i for i, which in enumerate(chunks) if which == WEAK_NULL]
        if run is None or not weak:
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        per_chunk = x.shape[0] // len(chunks)
        if isinstance(run.coefficient, torch.Tensor) and run.coefficient.shape[0] != per_chunk:
            raise GuidanceInputError("Personalization guidance: per-row omega values do not match the batch.")
        run.rows = [slice(i * per_chunk, (i + 1) * per_chunk) for i in weak]
        run.batch = x.shape[0]
        try:
            run.before_weak_forward()
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        finally:
            run.rows = None

    def omega(self, model, timestep: torch.Tensor) -> float:
        schedule = self.config.weak.schedule
        if schedule.is_constant:
            return schedule.omega_start
        sigma = float(timestep.flatten()[0])
        # Progress depends on the sigma and the model's sampling alone: kept across runs (a bisection costs ~1 ms).
        if self._progress_sampling is not model.model_sampling or len(self._progress_cache) > 4096:
            self._progress_sampling, self._progress_cache = model.model_sampling, {}
        p = self._progress_cache.get(sigma)
        if p is None:
            p = self._progress_cache[sigma] = progress_of_sigma(model.model_sampling, sigma)
        return omega_at(schedule, p)

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
        if self.run is not None:
            self.run.coefficient = coefficient
        out = comfy.samplers.calc_cond_batch(model, batch, x, timestep, model_options)
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
    """True when weak weights are the cheaper way for this pair (a full fine-tune): see the module docstring.

    A model that casts its weights on every forward (``manual_cast_dtype``) keeps the correction.
    """
    if getattr(model.model, "manual_cast_dtype", None) is not None:
        return False
    dense = sum(t.numel() for deltas in pair.deltas.values() if _single_dense(deltas) for t in deltas[0].tensors())
    return dense >= SPLIT_FRACTION * sum(p.numel() for p in model.model.diffusion_model.parameters())


def _workspace(model: comfy.model_patcher.ModelPatcher, pair: FinetunedPair) -> comfy.model_patcher.ModelPatcher:
    """The pair's workspace for weak weights formed once. Made on first use and shared by every guider of the pair
    (a sweep makes many; ComfyUI runs one sampling at a time), so that it is allocated and loaded once."""
    if pair.workspace is None:
        shapes = {}
        for path, deltas in pair.deltas.items():
            if _single_dense(deltas):
                layer = model.model.get_submodule(path)
                shapes[path] = {name: layer._parameters[name] for name in ("weight", "bias")
                                if getattr(deltas[0], name) is not None}
        pair.workspace = comfy.model_patcher.ModelPatcher(WeakWorkspace(shapes, model.offload_device),
                                                          load_device=model.load_device, offload_device=model.offload_device)
    return pair.workspace


def attach(model: comfy.model_patcher.ModelPatcher, config: GuidanceConfig) -> comfy.model_patcher.ModelPatcher:
    """A clone of ``model`` that samples with personalization guidance (see the module docstring)."""
    config.weak.pair.check_model(model)
    if config.estimate == Estimate.THREE_WAY:
        check_scale("personalization_scale", config.lambda_p)
    if model.get_wrappers(comfy.patcher_extension.WrappersMP.PREDICT_NOISE, WRAPPER_KEY):
        raise GuidanceInputError("This MODEL already has personalization guidance: apply it once.")
    patched = model.clone()
    pair = config.weak.pair
    # Per-row omegas (PG Sweep) take the correction: a layer runs its weak rows with one set of weak weights.
    weak_weights = config.rows is None and _prefers_weak_weights(patched, pair)
    # What the run needs loads with the model, in the same load_models_gpu call, within ComfyUI's memory budget:
    # the weak weights formed once where omega takes one value, else the delta.
    workspace = _workspace(patched, pair) if weak_weights and config.weak.schedule.is_flat else None
    patched.set_additional_models(WRAPPER_KEY, [pair.delta_patcher if workspace is None else workspace])
    runtime = _Runtime(config, weak_weights, None if workspace is None else workspace.model)
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY, runtime.outer_sample)
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.PREDICT_NOISE, WRAPPER_KEY, runtime.predict_noise)
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY, runtime.apply_model)
    return patched


__all__ = ["Estimate", "GuidanceConfig", "NULL_KEY", "RowScales", "WeakModel", "attach", "progress_of_sigma"]
