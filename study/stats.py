"""Intervals over replicates: Student's t on the replicate means, and what a difference's interval says.

Each replicate of the study is an independent run of the whole pipeline (its own
pre-training, fine-tuning and sampling noise), so its mean over pictures is one
independent draw whose spread already holds both sources of variation: how the
trainings came out and which pictures were drawn. The mean of R such draws has the
usual confidence interval mean +- t(0.975, R - 1) * sd / sqrt(R). With a handful of
replicates this is wider, and more honest, than a percentile bootstrap over them
(which is too narrow for small R); resampling pictures within each replicate as well
would count the picture noise twice, since it is already in the spread of the means.
Differences between two methods are taken within each replicate first (same model,
same noise), then given the same interval.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from functools import lru_cache

LEVEL = 0.95


def t_cdf(x: float, df: int, intervals: int = 2048) -> float:
    """Student's t distribution function, by Simpson's rule on the density from 0 to ``x``."""
    if x < 0:
        return 1.0 - t_cdf(-x, df, intervals)
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def pdf(v: float) -> float:
        return math.exp(log_norm - (df + 1) / 2 * math.log1p(v * v / df))

    h = x / intervals
    inner = sum((4 if i % 2 else 2) * pdf(i * h) for i in range(1, intervals))
    return 0.5 + h / 3 * (pdf(0.0) + inner + pdf(x))


@lru_cache(maxsize=64)
def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile (p > 0.5) of Student's t with ``df`` degrees of freedom, by bisection on ``t_cdf``."""
    if not 0.5 < p < 1 or df < 1:
        raise ValueError(f"t_quantile needs 0.5 < p < 1 and df >= 1, got p={p}, df={df}")
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        lo, hi = hi, 2 * hi
    for _ in range(45):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
    return (lo + hi) / 2


class Verdict(str, Enum):
    """What the interval of a difference says about its sign."""

    HIGHER = "higher"  # the whole interval above 0
    LOWER = "lower"  # the whole interval below 0
    WITHIN = "within the interval"  # 0 inside it: no difference shown
    UNKNOWN = "unknown"  # one replicate: no interval


@dataclass(frozen=True)
class Estimate:
    """A mean over ``n`` replicates and its two-sided confidence interval [lo, hi] (None for n = 1)."""

    mean: float
    lo: float | None
    hi: float | None
    n: int

    @property
    def half_width(self) -> float | None:
        return None if self.lo is None else (self.hi - self.lo) / 2

    @property
    def verdict(self) -> Verdict:
        """The sign of a difference, as far as its interval shows it."""
        if self.lo is None:
            return Verdict.UNKNOWN
        if self.lo > 0:
            return Verdict.HIGHER
        if self.hi < 0:
            return Verdict.LOWER
        return Verdict.WITHIN

    def contains(self, value: float) -> bool:
        return self.lo is not None and self.lo <= value <= self.hi


def estimate(values: list[float], level: float = LEVEL) -> Estimate:
    """The mean of per-replicate ``values`` and its t interval at ``level``."""
    n = len(values)
    if n == 0:
        raise ValueError("estimate needs at least one value")
    mean = sum(values) / n
    if n == 1:
        return Estimate(mean, None, None, 1)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_quantile(0.5 + level / 2, n - 1) * sd / math.sqrt(n)
    return Estimate(mean, mean - half, mean + half, n)
