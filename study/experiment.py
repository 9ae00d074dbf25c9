"""The comparison: every method on the same prompts and the same noise, scored exactly.

Subject prompts are "sks square on <context>" for every background; the one the
subject was photographed in is the *training context*, the others are *new
contexts*, where the fine-tuned model has to compose the subject with text it was
not fine-tuned on. Fidelity, alignment and diversity are reported on the new
contexts; the training context is a sanity check.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor

from guidance import OmegaSchedule, OmegaShape

from . import metrics, sample, world
from .config import Config
from .guiders import Counter, Method, ModelPair, Setting, denoiser

log = logging.getLogger(__name__)


def settings(config: Config) -> list[Setting]:
    """The grid: fine-tuned alone, CFG, autoguidance, and personalization guidance (constant, scheduled, three-way)."""
    grid = [Setting(Method.FINETUNED)]
    grid += [Setting(Method.CFG, lam) for lam in config.lambdas]
    grid += [Setting(Method.AUTOGUIDANCE, lam) for lam in config.lambdas]
    grid += [Setting(Method.TWO_WAY, lam, OmegaSchedule.constant(omega)) for omega in config.omegas for lam in config.lambdas]
    schedules = (
        OmegaSchedule(OmegaShape.LINEAR, 0.0, 1.0),  # strong unlearning first, none at the end
        OmegaSchedule(OmegaShape.LINEAR, 1.0, 0.0),  # the reverse
        OmegaSchedule(OmegaShape.CONSTANT, 0.75, 0.75, p_start=0.0, p_end=0.5),  # then plain CFG
    )
    grid += [Setting(Method.SCHEDULED, lam, schedule) for schedule in schedules for lam in config.lambdas]
    three_way = OmegaSchedule.constant(config.three_way_omega)
    grid += [
        Setting(Method.THREE_WAY, lam, three_way, lambda_p)
        for lambda_p in config.three_way_lambda_p
        for lam in config.lambdas
    ]
    return grid


def subject_prompts(config: Config) -> tuple[Tensor, Tensor]:
    """Tokens (contexts * seeds, 4) of the subject prompts, and which rows are new contexts."""
    rows = [world.encode("sks", "square", "", bg) for bg in world.BACKGROUNDS for _ in range(config.seeds)]
    tokens = torch.tensor(rows)
    new = tokens[:, 3] != world.encode(background=config.context)[3]
    return tokens, new


def noise_for(n: int, seed: int) -> Tensor:
    """Unit Gaussian starting noise, the same for every method."""
    return torch.randn(n, 3, world.RES, world.RES, generator=torch.Generator().manual_seed(seed))


@dataclass
class Scored:
    """A setting's pictures and their scores."""

    setting: Setting
    images: Tensor
    row: dict


def run_setting(setting: Setting, pair: ModelPair, tokens: Tensor, new: Tensor, noise: Tensor, config: Config) -> Scored:
    """Sample ``setting`` and score it; the scores are means over pictures."""
    sigmas = sample.karras_sigmas(config.sample_steps, config.sigma_min, config.sigma_max)
    counter = Counter()
    images = metrics.to_unit(sample.euler(denoiser(setting, pair, tokens, counter), noise, sigmas))
    fidelity = metrics.subject_fidelity(images)
    pattern = metrics.pattern_fidelity(images)
    alignment = metrics.context_alignment(images, tokens[:, 3])
    success = (fidelity >= config.success_threshold) & (alignment >= config.success_threshold)
    by_context = {
        bg: float(success[tokens[:, 3] == i + 1].float().mean()) for i, bg in enumerate(world.BACKGROUNDS)
    }
    groups = [images[i : i + config.seeds] for i in range(0, len(images), config.seeds)]
    new_groups = [g for g, is_new in zip(groups, new[:: config.seeds].tolist(), strict=True) if is_new]
    s = setting.schedule
    row = {
        "method": setting.method.value,
        "label": setting.label,
        "lambda": setting.lam,
        "lambda_p": setting.lambda_p,
        "omega": {"shape": s.shape.value, "start": s.omega_start, "end": s.omega_end, "p_start": s.p_start, "p_end": s.p_end},
        "evaluations_per_step": counter.evaluations / counter.steps,
        "fidelity": float(fidelity[new].mean()),
        "pattern_fidelity": float(pattern[new].mean()),
        "alignment": float(alignment[new].mean()),
        "success": float(success[new].float().mean()),
        "diversity": sum(metrics.diversity(g) for g in new_groups) / len(new_groups),
        "fidelity_training_context": float(fidelity[~new].mean()),
        "alignment_training_context": float(alignment[~new].mean()),
        "success_by_context": by_context,
    }
    return Scored(setting, images, row)


def text_following(pair: ModelPair, config: Config, finetuned: bool) -> dict:
    """How well a model follows prompts without the subject: every shape x colour x background once, CFG.

    With ``finetuned`` False the pair's weak model at omega 0 (the base model) is scored.
    Returns the fraction of pictures that show the prompt's shape, colour and background.
    """
    rows = [
        (0, s, c, b)
        for s in range(1, len(world.SHAPES))
        for c in range(1, world.VOCAB_SIZES[2])
        for b in range(1, world.VOCAB_SIZES[3])
    ]
    tokens = torch.tensor(rows)
    null = torch.zeros_like(tokens)
    noise = noise_for(len(rows), config.seed + 200)
    sigmas = sample.karras_sigmas(config.sample_steps, config.sigma_min, config.sigma_max)
    omega = 1.0 if finetuned else 0.0

    def step(x, sigma, p):
        s = torch.tensor(sigma)
        cond, uncond = pair.weak(x, s, tokens, omega), pair.weak(x, s, null, omega)
        return uncond + (cond - uncond) * config.drift_lambda

    images = metrics.to_unit(sample.euler(step, noise, sigmas))
    correct = metrics.prompt_accuracy(images, tokens).float().mean(dim=0)
    return {"shape": float(correct[0]), "colour": float(correct[1]), "background": float(correct[2])}
