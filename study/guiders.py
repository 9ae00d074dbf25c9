"""The samplers' denoisers for each guidance method, built on the ``guidance`` package.

A ``ModelPair`` gives the three predictions the methods need:

- ``ft(x, sigma, tokens)``: the fine-tuned model, D_ft.
- ``weak(x, sigma, tokens, omega)``: the weak model theta_pre + omega * delta, D_w.
  ``omega = 0`` is the base model, ``omega = 1`` the fine-tuned model.

``FullPair`` forms delta with ``guidance.weight_delta`` and evaluates the weak model
with interpolated weights; ``LoraPair`` evaluates the LoRA at strength ``omega * s``.

A ``Setting`` names a method and its scales; ``denoiser(setting, pair, tokens)``
returns the guided D(x, sigma, p) for the sampler. The estimates themselves are the
package's: ``guidance.cfg``, ``guidance.plan_evaluations`` with ``guidance.combine``
(two-way and three-way), and ``guidance.omega_at`` for omega over the run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

import torch
from torch import Tensor, nn
from torch.func import functional_call

import guidance
from guidance import OmegaSchedule, OmegaShape

from . import lora
from .model import Denoiser
from .sample import Denoise


class FullPair:
    """A base and a fully fine-tuned model; the weak model's weights are interpolated per call."""

    def __init__(self, base: Denoiser, finetuned: Denoiser):
        self.model = finetuned
        self.base = {k: v.detach() for k, v in base.state_dict().items()}
        self.delta = guidance.weight_delta(base.state_dict(), finetuned.state_dict())

    def ft(self, x: Tensor, sigma: Tensor, tokens: Tensor) -> Tensor:
        return self.model(x, sigma, tokens)

    def weak(self, x: Tensor, sigma: Tensor, tokens: Tensor, omega: float) -> Tensor:
        if omega == 1.0:
            return self.ft(x, sigma, tokens)
        weights = {k: v + omega * self.delta[k] if k in self.delta else v for k, v in self.base.items()}
        return functional_call(self.model, weights, (x, sigma, tokens))


class LoraPair:
    """A base model carrying a LoRA trained at strength ``strength``; the weak model is the LoRA at ``omega * strength``.

    Each evaluation runs the plain network with the LoRA merged at the strength it
    needs (``lora.merged_state_dict``): the same function as running the adapters,
    and as fast as the full fine-tune's evaluations.
    """

    def __init__(self, model: nn.Module, strength: float = 1.0):
        self.lora_model = model
        self.strength = strength
        self.plain = lora.unwrapped(model)
        self._merged: dict[float, dict[str, Tensor]] = {}

    def _at(self, strength: float, x: Tensor, sigma: Tensor, tokens: Tensor) -> Tensor:
        if strength not in self._merged:
            if len(self._merged) > 8:
                self._merged.clear()
            self._merged[strength] = lora.merged_state_dict(self.lora_model, strength)
        return functional_call(self.plain, self._merged[strength], (x, sigma, tokens))

    def ft(self, x: Tensor, sigma: Tensor, tokens: Tensor) -> Tensor:
        return self._at(self.strength, x, sigma, tokens)

    def weak(self, x: Tensor, sigma: Tensor, tokens: Tensor, omega: float) -> Tensor:
        return self._at(omega * self.strength, x, sigma, tokens)


ModelPair = FullPair | LoraPair


class Method(str, Enum):
    """The sampling methods compared."""

    FINETUNED = "fine-tuned"  # D_ft(x, c), no guidance
    CFG = "CFG"  # D_ft(null) + lambda (D_ft(c) - D_ft(null))
    AUTOGUIDANCE = "autoguidance"  # D_pre(c) + lambda (D_ft(c) - D_pre(c))
    TWO_WAY = "PG two-way"  # D_w(null) + lambda (D_ft(c) - D_w(null)), constant omega
    SCHEDULED = "PG scheduled"  # the same with omega(p) over the run
    THREE_WAY = "PG three-way"  # D_w(null) + lambda_p (D_ft(null) - D_w(null)) + lambda_t (D_ft(c) - D_ft(null))


@dataclass(frozen=True)
class Setting:
    """One method at one set of scales. ``lam`` is lambda (lambda_t for three-way)."""

    method: Method
    lam: float = 1.0
    schedule: OmegaSchedule = field(default_factory=lambda: OmegaSchedule.constant(1.0))
    lambda_p: float | None = None

    @property
    def label(self) -> str:
        s = self.schedule
        if self.method in (Method.FINETUNED,):
            return self.method.value
        if self.method in (Method.CFG, Method.AUTOGUIDANCE):
            return f"{self.method.value} lambda={self.lam:g}"
        if s.shape == OmegaShape.CONSTANT or s.omega_start == s.omega_end:
            omega = f"omega={s.omega_start:g}"
        else:
            omega = f"omega {s.shape.value} {s.omega_start:g}->{s.omega_end:g}"
        if (s.p_start, s.p_end) != (0.0, 1.0):
            omega += f" on p in [{s.p_start:g},{s.p_end:g}], CFG elsewhere"
        if self.method == Method.THREE_WAY:
            return f"{self.method.value} {omega} lambda_p={self.lambda_p:g} lambda_t={self.lam:g}"
        return f"{self.method.value} {omega} lambda={self.lam:g}"


@dataclass
class Counter:
    """Model evaluations made, and sampling steps taken."""

    evaluations: int = 0
    steps: int = 0


def denoiser(setting: Setting, pair: ModelPair, tokens: Tensor, counter: Counter | None = None) -> Denoise:
    """The guided D(x, sigma, p) of ``setting`` for prompts ``tokens`` (N, 4); the null prompt is all zeros."""
    null = torch.zeros_like(tokens)
    counter = counter if counter is not None else Counter()

    def evaluate(fn, *args):
        counter.evaluations += 1
        return fn(*args)

    def step(x: Tensor, sigma: float, p: float) -> Tensor:
        counter.steps += 1
        s = torch.tensor(sigma)
        method = setting.method
        if method == Method.FINETUNED:
            return evaluate(pair.ft, x, s, tokens)
        if method == Method.CFG:
            return guidance.cfg(evaluate(pair.ft, x, s, tokens), evaluate(pair.ft, x, s, null), setting.lam)
        if method == Method.AUTOGUIDANCE:
            return guidance.cfg(evaluate(pair.ft, x, s, tokens), evaluate(pair.weak, x, s, tokens, 0.0), setting.lam)
        omega = guidance.omega_at(setting.schedule, p)
        if method == Method.THREE_WAY:
            lambda_p, lambda_t = setting.lambda_p, setting.lam
        else:
            lambda_p = lambda_t = setting.lam
        plan = guidance.plan_evaluations(lambda_p, lambda_t, omega, negative_is_null=True)
        d_ft_c = evaluate(pair.ft, x, s, tokens) if plan.ft_positive else None
        d_ft_n = evaluate(pair.ft, x, s, null) if plan.ft_negative else None
        d_w_null = evaluate(pair.weak, x, s, null, omega) if plan.weak_null else None
        return guidance.combine(plan, d_ft_c, d_ft_n, d_w_null, lambda_p, lambda_t)

    return step
