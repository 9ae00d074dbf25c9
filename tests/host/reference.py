"""References computed another way: separately built models whose weights are interpolated by hand,
and the guidance formulas written out here, not imported from the pack."""

from __future__ import annotations

import comfy.samplers
import comfy.supported_models
import tiny
import torch

PREFIX = "model.diffusion_model."


def lora_weights(base: dict, lora: dict, strength: float) -> dict:
    """base + strength * alpha/rank * up @ down, for each layer the LoRA names (SD1.5 ``lora_unet_`` keys)."""
    by_name = {"lora_unet_" + k[len(PREFIX):-len(".weight")].replace(".", "_"): k for k in base if k.endswith(".weight")}
    out = dict(base)
    for key in lora:
        if not key.endswith(".lora_up.weight"):
            continue
        name = key[: -len(".lora_up.weight")]
        up, down = lora[key], lora[name + ".lora_down.weight"]
        scale = float(lora[name + ".alpha"]) / down.shape[0]
        target = by_name[name]
        diff = (up.flatten(1) @ down.flatten(1)).reshape(base[target].shape)
        out[target] = base[target] + strength * scale * diff
    return out


def interpolate(base: dict, finetuned: dict, omega: float) -> dict:
    return {k: base[k] + omega * (finetuned[k] - base[k]) if base[k].is_floating_point() else base[k] for k in base}


def per_block(weights, factor_of):
    """Weak weights per block, materialized by hand: tensor ``key`` of ``weights(omega_b)``, where
    omega_b = 1 - f (1 - omega) and f = ``factor_of(key)`` (docs/design.md, "Omega per block"). ``weights(omega)`` is
    the weak model's state dict for one omega (``interpolate`` or ``lora_weights`` at omega times the strength)."""
    def weak(omega):
        by_omega, out = {}, {}
        for key in weights(omega):
            omega_b = 1.0 - factor_of(key) * (1.0 - omega)
            if omega_b not in by_omega:
                by_omega[omega_b] = weights(omega_b)
            out[key] = by_omega[omega_b][key]
        return out
    return weak


class HandModel:
    """A separately built BaseModel; ``load(sd)`` replaces its weights (only when they differ from the last)."""

    def __init__(self, model_class, config):
        self.patcher = tiny.model_patcher(model_class, config, tiny.unet_state_dict(config, seed=999, model_class=model_class))
        self.model = self.patcher.model
        self._key = None

    def load(self, key, sd):
        if key != self._key:
            self.model.load_state_dict({k[len("model."):]: v for k, v in sd.items()}, strict=False)
            self._key = key

    def __call__(self, x, sigma, cond):
        ctx, y = cond
        kwargs = {"c_crossattn": ctx.expand(x.shape[0], *ctx.shape[1:])}
        if y is not None:
            kwargs["y"] = y.expand(x.shape[0], *y.shape[1:])
        return self.model.apply_model(x, sigma, **kwargs)


def progress(model_sampling, sigma: float) -> float:
    """Sampling progress of a discrete-time model: 1 - t / 999 with t the (fractional) timestep of sigma."""
    return 1.0 - float(model_sampling.timestep(torch.tensor(sigma))) / 999.0


def omega_linear(omega_start, omega_end, p_start, p_end):
    def omega(p):
        if p < p_start or p > p_end:
            return 1.0
        t = (p - p_start) / (p_end - p_start)
        return omega_start + (omega_end - omega_start) * t
    return omega


class HandGuider(comfy.samplers.CFGGuider):
    """Samples with the estimate written out by hand on separately materialized models.

    ``weights(omega)`` returns the weak model's state dict; ``ft_weights`` the fine-tuned one.
    """

    def __init__(self, model_class, config, ft_weights, weights, omega_of_p, conds, lam_t, lam_p=None):
        self.ft = HandModel(model_class, config)
        self.ft.load("ft", ft_weights)
        self.weak = HandModel(model_class, config)
        super().__init__(self.ft.patcher)
        self.weights, self.omega_of_p = weights, omega_of_p
        self.hand_conds = conds  # {"c": (ctx, y), "null": ..., "n": ... or None}
        self.lam_t, self.lam_p = lam_t, lam_p
        # Conds only for ComfyUI's bookkeeping (process_conds); predict_noise uses the hand conds above.
        extra = {} if conds["c"][1] is None else {"pooled_output": torch.zeros(1, 1280)}
        self.set_conds([[conds["c"][0], extra]], [[conds["null"][0], extra]])
        self.set_cfg(lam_t)
        self.omegas = []

    def predict_noise(self, x, timestep, model_options=None, seed=None):
        model_options = {} if model_options is None else model_options
        sigma = float(timestep.flatten()[0])
        omega = self.omega_of_p(progress(self.ft.model.model_sampling, sigma))
        self.omegas.append(omega)
        self.weak.load(omega, self.weights(omega))
        c, null, n = self.hand_conds["c"], self.hand_conds["null"], self.hand_conds.get("n")
        d_c = self.ft(x, timestep, c)
        d_w = self.weak(x, timestep, null)
        if self.lam_p is None:  # two-way
            return d_w + self.lam_t * (d_c - d_w)
        d_n = self.ft(x, timestep, n if n is not None else null)
        return d_w + self.lam_p * (d_n - d_w) + self.lam_t * (d_c - d_n)


# fp32 tolerance for whole sampling runs. Random-weight UNets put latents in the hundreds, and the pack
# sums W x + (omega - 1) (delta x) where the reference computes (W + (omega - 1) delta) x: measured
# differences are about 2.5e-6 of the latent's norm, so 2e-5 of it (and elementwise 1e-5 of its peak) leaves
# a margin while a wrong weight state (the clone trap) misses by orders of magnitude (test_weak_weights.py).
REL_TOL = 2e-5


def relative_error(actual, expected) -> float:
    return float((actual - expected).norm() / expected.norm())


def close(actual, expected):
    scale = float(expected.abs().max())
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5 * scale)
    assert relative_error(actual, expected) < REL_TOL
    return True


__all__ = ["HandGuider", "interpolate", "lora_weights", "omega_linear", "per_block", "progress", "close", "relative_error",
           "REL_TOL"]
