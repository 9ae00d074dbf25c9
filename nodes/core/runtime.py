"""Personalization guidance inside ComfyUI's sampling: one core for the GUIDER and the KSampler route.

``attach`` returns a clone of the fine-tuned MODEL carrying four wrappers:

- OUTER_SAMPLE: for the length of one sampling run, a ``routing.Run`` with the per-module
  handlers of ``handlers.py``. Undone in ``finally``, so an interrupted or failed run leaves
  the model as it was. A model that ComfyUI would run on several GPUs is refused here,
  before anything loads. A run whose guidance would do nothing at any of its steps (no
  step inside the guidance interval, as at denoise < 1; omega 1 throughout) logs one warning.
- SAMPLER_SAMPLE: once the model is loaded, and before the first step, the run chooses
  each changed module's handler and the route (``routing.py``).
- PREDICT_NOISE: replaces CFG's combination with the estimate (docs/design.md, "The
  estimates"). ComfyUI's pre- and post-CFG hooks are replayed, seeing the weak null
  prediction as "uncond".
- APPLY_MODEL: tells the handlers which rows of the batch are the weak model's
  (``transformer_options["cond_or_uncond"]``), and after the first forward with weak
  rows checks that ComfyUI called every module whose handler relies on it.

Where the weak weights of a full pair live is planned in ``weak_weights.py``; the words the
nodes use (``GuidanceConfig`` and the rest) are in ``vocabulary.py``.
"""

from __future__ import annotations

import dataclasses
import logging
import math

import comfy.model_patcher
import comfy.patcher_extension
import comfy.sampler_helpers
import comfy.samplers
import torch

from ...guidance import (
    GuidanceInputError,
    combine,
    in_interval,
    omega_at_sigma,
    plan_evaluations,
    plan_for_rows,
    progress_of_sigma,
)
from . import host
from .routing import Reroute, Run
from .rows import ALL
from .vocabulary import (
    FT_NEGATIVE,
    FT_POSITIVE,
    NULL_KEY,
    WEAK_NULL,
    WRAPPER_KEY,
    Estimate,
    GuidanceConfig,
    Route,
)
from .weak_weights import WeakWorkspace, prefers_weak_weights, workspace_for

log = logging.getLogger(__name__)


def _same_conditioning(conditioning: list, converted: list | None) -> bool:
    """True when ``converted`` (a guider's converted conds) was made from the very same CONDITIONING.

    In a graph that wires one empty-prompt encode to both the sampler's negative and
    null_conditioning, n is null: the cheaper evaluation plan then applies.
    """
    if converted is None or len(conditioning) != len(converted):
        return False
    for (tensor, extra), entry in zip(conditioning, converted, strict=True):
        if entry.get("cross_attn") is not tensor or any(entry.get(k) is not v for k, v in extra.items()):
            return False
    return True



class _Runtime:
    """The wrappers of one attached MODEL. Holds the config, and the current run while sampling."""

    def __init__(self, config: GuidanceConfig, weak_weights: bool, workspace: WeakWorkspace | None):
        self.config = config
        self.weak_weights = weak_weights
        self.workspace = workspace
        self.run: Run | None = None
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
        sigmas = args[3] if len(args) > 3 else kwargs.get("sigmas")
        if sigmas is not None:
            self.warn_if_unguided(guider.model_patcher.get_model_object("model_sampling"), sigmas)
        self.run = Run(self.config.weak.pair, self.config, self.weak_weights, self.workspace)
        try:
            return executor(*args, **kwargs)
        finally:
            self.run.close()
            self.run = None

    # SAMPLER_SAMPLE: the model is loaded, no step has run.
    def sampler_sample(self, executor, guider, *args, **kwargs):
        if self.run is not None and self.run.route is None:
            self.run.prepare(guider.model_patcher.model, patcher=guider.model_patcher)
        return executor(guider, *args, **kwargs)

    # APPLY_MODEL
    def apply_model(self, executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options=None,
                    **kwargs):
        transformer_options = {} if transformer_options is None else transformer_options
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
            rows = ALL
        elif run.route == Route.OWN_FORWARD:
            raise GuidanceInputError("Personalization guidance: a weak evaluation meant for a forward of its own was "
                                     "batched with others.")
        else:
            rows = [slice(i * per_chunk, (i + 1) * per_chunk) for i in weak]
        with state.weak_call(rows, x.shape[0]):
            return run.forward(executor, args, kwargs)

    def progress(self, model_sampling, sigma: float) -> float:
        # Progress depends on the sigma and the model's sampling alone: kept across runs (a bisection costs ~1 ms).
        if self._progress_sampling is not model_sampling or len(self._progress_cache) > 4096:
            self._progress_sampling, self._progress_cache = model_sampling, {}
        p = self._progress_cache.get(sigma)
        if p is None:
            p = self._progress_cache[sigma] = progress_of_sigma(model_sampling.percent_to_sigma, sigma)
        return p

    def warn_if_unguided(self, sampling, sigmas: torch.Tensor) -> None:
        """One warning when no step of this run is guided: none inside the guidance interval (the interval is read on
        the model's full noise scale, so at denoise < 1 the first step is already past progress 0), omega 1 at every
        step, or every block's factor 0. Each step's omega as sampling computes it (``omega_at_sigma``)."""
        steps = [float(s) for s in sigmas.flatten()[:-1] if math.isfinite(float(s))]  # the last sigma is the end
        if not steps:
            return
        schedule, rows, factors = self.config.weak.schedule, self.config.rows, self.config.weak.factors
        progress = [self.progress(sampling, s) for s in steps]
        if rows is not None:  # PG Sweep's rows: one constant omega per row over the whole run
            inside, omegas = True, list(rows.omega)
        else:
            inside = any(in_interval(schedule, s, sampling.percent_to_sigma) for s in steps)
            omegas = [omega_at_sigma(schedule, s, sampling.percent_to_sigma, lambda _, p=p: p)
                      for s, p in zip(steps, progress, strict=True)]
        if not inside:
            why = (f"no step falls inside the guidance interval [{schedule.p_start:g}, {schedule.p_end:g}]", "move the "
                   "guidance interval over these steps")
        elif all(o == 1.0 for o in omegas):
            why = "omega is 1 at every step", "lower omega"
        elif factors and max(factors.values()) == 0.0:
            why = "every block's factor is 0", "raise a block factor of per_block"
        else:
            return
        log.warning(
            "Personalization guidance does nothing in this run: its %d step(s) sit at progress %.2f-%.2f and %s. "
            "Progress is read on the model's full noise scale, as ComfyUI's timestep ranges are (with denoise below 1 "
            "the first step is already past 0). The weak model is the fine-tuned model at every step, so the run is "
            "plain CFG on the fine-tuned model; to guide, %s.", len(steps), min(progress), max(progress), *why)

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
        (``Reroute``) changes it, and the step's evaluations are made again."""
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
            except Reroute as change:
                run.reroute(change)
        raise GuidanceInputError("Personalization guidance could not settle on a route for this model.")

    # PREDICT_NOISE
    def predict_noise(self, executor, x, timestep, model_options=None, seed=None):
        model_options = {} if model_options is None else model_options
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
        d_c, d_w, d_n = (o if c is not None else None for o, c in zip(out, batch, strict=True))
        result = combine(evaluations, d_c, d_n, d_w, lambda_p, lambda_t)
        uncond_denoised = d_w if d_w is not None else d_n if d_n is not None else out[WEAK_NULL]
        for fn in model_options.get("sampler_post_cfg_function", []):
            result = fn({"denoised": result, "cond": positive, "uncond": batch[WEAK_NULL], "cond_scale": lambda_t,
                         "model": model, "uncond_denoised": uncond_denoised, "cond_denoised": out[FT_POSITIVE],
                         "sigma": timestep, "model_options": model_options, "input": x})
        return result


def attach(model: comfy.model_patcher.ModelPatcher, config: GuidanceConfig) -> comfy.model_patcher.ModelPatcher:
    """A clone of ``model`` that samples with personalization guidance (see the module docstring)."""
    pair = config.weak.pair
    pair.check_model(model)
    _ = config.weak.factors  # omega per block: resolved once, and a setting that fits no changed layer refused, here
    if model.get_wrappers(comfy.patcher_extension.WrappersMP.PREDICT_NOISE, WRAPPER_KEY):
        raise GuidanceInputError("This MODEL already has personalization guidance: apply it once.")
    patched = model.clone()
    # Per-row omegas (PG Sweep) take the correction: a layer runs its weak rows with one set of weak weights.
    weak_weights = config.rows is None and prefers_weak_weights(patched, pair)
    # What the run needs loads with the model, in the same load_models_gpu call, within ComfyUI's memory budget:
    # the weak weights formed once where omega takes one value and there is room, else the delta.
    workspace = workspace_for(patched, pair) if weak_weights and config.weak.schedule.is_flat else None
    # A pair read from both models (GGUF) also needs the base loaded.
    extra = [pair.delta_patcher if workspace is None else workspace]
    patched.set_additional_models(WRAPPER_KEY, extra + ([pair.reads_base] if pair.reads_base is not None else []))
    runtime = _Runtime(config, weak_weights, None if workspace is None else workspace.model)
    for kind, function in ((comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, runtime.outer_sample),
                           (comfy.patcher_extension.WrappersMP.SAMPLER_SAMPLE, runtime.sampler_sample),
                           (comfy.patcher_extension.WrappersMP.PREDICT_NOISE, runtime.predict_noise),
                           (comfy.patcher_extension.WrappersMP.APPLY_MODEL, runtime.apply_model)):
        patched.add_wrapper_with_key(kind, WRAPPER_KEY, function)
    return patched


__all__ = ["attach"]
