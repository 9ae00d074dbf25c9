"""The study's settings: ``FULL`` for ``python -m study.run``, ``QUICK`` for the test suite."""

from __future__ import annotations

from dataclasses import dataclass, replace

REPLICATE_SEED_STRIDE = 1000  # replicate r runs with seed + r * stride: its own pre-training, fine-tunes and noise


@dataclass(frozen=True)
class Config:
    """Everything a run depends on. Seeds derive from ``seed``; the numbers also depend on ``threads``, not on ``workers``."""

    seed: int = 0
    replicates: int = 4  # independent runs of the whole pipeline; every figure is a mean over them
    workers: int = 2  # processes running replicates side by side (one per core)
    threads: int = 1  # torch's CPU threads in each
    # Pre-training (the base model).
    width: int = 32
    pretrain_steps: int = 1500
    pretrain_batch: int = 64
    pretrain_lr: float = 2e-3
    ema_decay: float = 0.995
    drop_slot: float = 0.1  # each content slot of a caption left empty
    drop_prompt: float = 0.15  # whole caption dropped to the null prompt (for CFG)
    # Personalization (DreamBooth without prior preservation).
    context: str = "beach"  # the one background the subject's photos show
    photos: int = 5
    ft_steps: int = 300
    ft_batch: int = 16
    ft_lr: float = 1e-3
    lora_rank: int = 4
    lora_steps: int = 300
    lora_lr: float = 5e-3
    # Sampling and evaluation.
    sample_steps: int = 12
    sigma_min: float = 0.02
    sigma_max: float = 20.0
    seeds: int = 12  # pictures per prompt, the same noise for every method
    lambdas: tuple[float, ...] = (1.5, 2.0, 3.0, 5.0)
    omegas: tuple[float, ...] = (0.0, 0.5, 0.75, 0.9)
    three_way_omega: float = 0.5
    three_way_lambda_p: tuple[float, ...] = (1.5,)
    drift_lambda: float = 3.0  # CFG scale for the check on prompts without the subject
    success_threshold: float = 0.75  # a picture "succeeds" with fidelity and alignment both at least this

    def replicate(self, r: int) -> Config:
        """The config of replicate ``r``: the same settings with its own seed."""
        return replace(self, seed=self.seed + r * REPLICATE_SEED_STRIDE)


FULL = Config()

QUICK = replace(
    FULL,
    replicates=2,
    width=8,
    pretrain_steps=20,
    pretrain_batch=16,
    photos=3,
    ft_steps=5,
    ft_batch=4,
    lora_steps=5,
    sample_steps=3,
    seeds=2,
    lambdas=(2.0,),
    omegas=(0.5,),
)
