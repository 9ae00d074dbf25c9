"""Training: pre-training on the world, and DreamBooth-style personalization (full and LoRA).

Personalization follows DreamBooth without its prior-preservation loss: a few
photos of the subject in one context, one prompt ("sks square on <context>"), the
denoising loss, enough steps to overfit. That is the failure personalization
guidance is meant to fix: the subject is learned, the rest of the prompt is
forgotten.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from . import lora, world
from .model import Denoiser, loss

log = logging.getLogger(__name__)


def _fit(model: nn.Module, params: Iterable[nn.Parameter], batches, steps: int, lr: float,
         generator: torch.Generator, what: str, ema: nn.Module | None = None, ema_decay: float = 0.0) -> None:
    """Adam on ``batches()`` for ``steps`` steps (5% linear warm-up, then cosine decay), with an optional EMA copy."""
    params = list(params)
    opt = torch.optim.Adam(params, lr=lr)
    warmup = max(1, steps // 20)

    def factor(i: int) -> float:
        if i < warmup:
            return (i + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (i - warmup) / max(1, steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    ema_pairs = list(zip(ema.parameters(), model.parameters(), strict=True)) if ema is not None else []
    running, start = None, time.perf_counter()
    for i in range(steps):
        images, tokens = batches()
        value = loss(model, images, tokens, generator)
        opt.zero_grad(set_to_none=True)
        value.backward()
        opt.step()
        sched.step()
        if ema_pairs:
            # Warm-up on the EMA: average over roughly the last min(i, 1 / (1 - decay)) steps.
            decay = min(ema_decay, (1 + i) / (10 + i))
            with torch.no_grad():
                for e, p in ema_pairs:
                    e.lerp_(p, 1 - decay)
        running = value.item() if running is None else 0.98 * running + 0.02 * value.item()
        if (i + 1) % max(1, steps // 5) == 0:
            log.info("%s: step %d/%d, loss %.4f, %.0f s", what, i + 1, steps, running, time.perf_counter() - start)


def pretrain(width: int, steps: int, batch: int, lr: float, ema_decay: float, drop_slot: float,
             drop_prompt: float, generator: torch.Generator) -> Denoiser:
    """The base model: trained on fresh pictures of the world every step; returns its EMA weights."""
    model = Denoiser(world.VOCAB_SIZES, width=width)
    ema = copy.deepcopy(model).requires_grad_(False)
    _fit(model, model.parameters(), lambda: world.sample_pretraining(batch, generator, drop_slot, drop_prompt),
         steps, lr, generator, "pre-training", ema=ema, ema_decay=ema_decay)
    return ema.eval()


def _personal_batches(photos: Tensor, tokens: tuple[int, ...], batch: int, generator: torch.Generator):
    prompt = torch.tensor(tokens).expand(batch, -1)

    def batches():
        pick = torch.randint(0, photos.shape[0], (batch,), generator=generator)
        return photos[pick], prompt

    return batches


def finetune_full(base: Denoiser, photos: Tensor, tokens: tuple[int, ...], steps: int, batch: int, lr: float,
                  generator: torch.Generator) -> Denoiser:
    """DreamBooth, full fine-tune: every weight (token embeddings included) on the subject's photos."""
    model = copy.deepcopy(base).requires_grad_(True).train()
    _fit(model, model.parameters(), _personal_batches(photos, tokens, batch, generator), steps, lr, generator,
         "full fine-tune")
    return model.requires_grad_(False).eval()


def finetune_lora(base: Denoiser, photos: Tensor, tokens: tuple[int, ...], rank: int, steps: int, batch: int,
                  lr: float, generator: torch.Generator) -> nn.Module:
    """DreamBooth-LoRA: a rank-``rank`` LoRA on every Linear and Conv2d; the base and the token embeddings stay frozen."""
    model = copy.deepcopy(base)
    params = lora.add_lora(model.net, rank=rank, alpha=rank)
    model.train()
    _fit(model, params, _personal_batches(photos, tokens, batch, generator), steps, lr, generator, "LoRA fine-tune")
    return model.requires_grad_(False).eval()
