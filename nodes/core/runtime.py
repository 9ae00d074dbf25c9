"""Personalization guidance inside ComfyUI's sampling: one core for the GUIDER and the KSampler route.

``attach`` returns a clone of the fine-tuned MODEL carrying three wrappers:

- OUTER_SAMPLE: for the length of one sampling run, forward hooks on the layers
  that the personalization changed. Removed in ``finally``, so an interrupted or
  failed run leaves the model as it was; the weights themselves are never touched.
- PREDICT_NOISE: replaces CFG's combination with the estimate of SPEC.md. The
  evaluations it needs go through one ``calc_cond_batch`` call, so they are batched
  exactly as CFG's cond and uncond are; ComfyUI's pre- and post-CFG hooks are
  replayed, seeing the weak null prediction as "uncond".
- APPLY_MODEL: tells the layer hooks which rows of the batch are the weak model's
  (``transformer_options["cond_or_uncond"]``). Those rows get
  ``(omega - 1) * F_delta(x)`` added to each changed layer's output, which turns
  theta_ft into theta_pre + omega * delta for them alone (``guidance.deltas``).
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
    GuidanceInputError,
    LayerDelta,
    LowRankDelta,
    OmegaSchedule,
    add_weak_correction,
    check_scale,
    combine,
    omega_at,
    plan_evaluations,
    rows_for_layer,
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


class _Run:
    """State of one sampling run: the layer hooks, and which rows are weak in the current forward."""

    def __init__(self, pair: FinetunedPair, diffusion_parent: torch.nn.Module):
        self.coefficient = 0.0
        self.rows: list[slice] | None = None  # the weak chunks of the current forward's batch
        self.batch = 0
        self.device_deltas: dict[int, LayerDelta] = {}
        self.handles = []
        for path, deltas in pair.deltas.items():
            layer = diffusion_parent.get_submodule(path)
            self.handles.append(layer.register_forward_hook(self._hook(deltas)))

    def close(self):
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        self.device_deltas.clear()

    def _on(self, delta: LayerDelta, like: torch.Tensor) -> LayerDelta:
        """The delta on the device and in the dtype of ``like``, converted once per run.

        Normally a no-op: ComfyUI has loaded the deltas with the model. It converts when the
        model computes in another dtype, or when a low-VRAM load left some of them offloaded.
        """
        cached = self.device_deltas.get(id(delta))
        if cached is None:
            def move(t):
                return None if t is None else t.to(device=like.device, dtype=like.dtype)
            if isinstance(delta, LowRankDelta):
                cached = LowRankDelta(up=move(delta.up), down=move(delta.down), scale=delta.scale)
            else:
                cached = type(delta)(weight=move(delta.weight), bias=move(delta.bias))
            self.device_deltas[id(delta)] = cached
        return cached

    def _hook(self, deltas: list[LayerDelta]):
        def hook(layer, args, out):
            if self.rows is None or self.coefficient == 0.0:
                return None
            x = args[0]
            for chunk in self.rows:
                rows = rows_for_layer(chunk, self.batch, x.shape[0])
                for delta in deltas:
                    out = add_weak_correction(layer, x, out, self._on(delta, x), rows, self.coefficient)
            return out

        return hook


class _Runtime:
    """The wrappers of one attached MODEL. Holds the config, and the current run while sampling."""

    def __init__(self, config: GuidanceConfig):
        self.config = config
        self.run: _Run | None = None
        self._progress_cache: dict[float, float] = {}

    # OUTER_SAMPLE
    def outer_sample(self, executor, *args, **kwargs):
        guider = executor.class_obj
        if self.run is not None:
            raise GuidanceInputError("Personalization guidance is already sampling with this model.")
        null = self.config.null
        if null is not None and not _same_conditioning(null, guider.original_conds.get("negative")):
            guider.conds[NULL_KEY] = comfy.sampler_helpers.convert_cond(null)
        self.run = _Run(self.config.weak.pair, guider.model_patcher.model)
        self._progress_cache.clear()
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
        run.rows = [slice(i * per_chunk, (i + 1) * per_chunk) for i in weak]
        run.batch = x.shape[0]
        try:
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        finally:
            run.rows = None

    def omega(self, model, timestep: torch.Tensor) -> float:
        schedule = self.config.weak.schedule
        if schedule.is_constant:
            return schedule.omega_start
        sigma = float(timestep.flatten()[0])
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
        omega = self.omega(model, timestep)
        evaluations = plan_evaluations(lambda_p, lambda_t, omega, negative_is_null=NULL_KEY not in conds)
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
            self.run.coefficient = omega - 1.0
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


def attach(model: comfy.model_patcher.ModelPatcher, config: GuidanceConfig) -> comfy.model_patcher.ModelPatcher:
    """A clone of ``model`` that samples with personalization guidance (see the module docstring)."""
    config.weak.pair.check_model(model)
    if config.estimate == Estimate.THREE_WAY:
        check_scale("personalization_scale", config.lambda_p)
    if model.get_wrappers(comfy.patcher_extension.WrappersMP.PREDICT_NOISE, WRAPPER_KEY):
        raise GuidanceInputError("This MODEL already has personalization guidance: apply it once.")
    patched = model.clone()
    # The delta tensors load with the model, in the same load_models_gpu call, within ComfyUI's memory budget.
    patched.set_additional_models(WRAPPER_KEY, [config.weak.pair.delta_patcher])
    runtime = _Runtime(config)
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY, runtime.outer_sample)
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.PREDICT_NOISE, WRAPPER_KEY, runtime.predict_noise)
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY, runtime.apply_model)
    return patched


__all__ = ["Estimate", "GuidanceConfig", "NULL_KEY", "WeakModel", "attach", "progress_of_sigma"]
