"""From the replicates of a run to estimates: each setting's scores over replicates, best settings, paired differences.

Every comparison here is *paired*: two settings are compared within each replicate
(same trained models, same starting noise), and the per-replicate differences get
the interval of ``stats.estimate``. A method's "best setting" is the one with the
highest mean success over replicates (ties: higher fidelity + alignment). When one
method's best is compared with another's, the best is chosen *without* the replicate
it is scored on (leave one replicate out): choosing the maximum of many noisy
settings and scoring it on the same data would favour the method with the most
settings, and personalization guidance has ten times as many as CFG.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from .guiders import Method
from .stats import Estimate, estimate

METRICS = (
    "success", "fidelity", "pattern_fidelity", "alignment", "diversity",
    "fidelity_training_context", "alignment_training_context",
)
PG_METHODS = (Method.TWO_WAY.value, Method.SCHEDULED.value, Method.THREE_WAY.value)


@dataclass
class Setting:
    """One setting's scores in every replicate of a run."""

    label: str
    row: dict  # the first replicate's row: method, scales, omega, evaluations per step
    values: dict[str, list[float]]  # metric -> one value per replicate
    by_context: dict[str, list[float]]  # context -> success, one value per replicate

    @property
    def method(self) -> str:
        return self.row["method"]

    def estimate(self, metric: str) -> Estimate:
        return estimate(self.values[metric])

    def mean(self, metric: str, leave_out: int | None = None) -> float:
        values = [v for i, v in enumerate(self.values[metric]) if i != leave_out]
        return sum(values) / len(values)


Table = dict[str, Setting]  # label -> setting, in the order of ``experiment.settings``


def table(results: dict, model: str) -> Table:
    """Every setting of ``model`` (a fine-tune's name) across the replicates of ``results``."""
    out: Table = {}
    for rep in results["replicates"]:
        for row in rep["models"][model]["settings"]:
            s = out.setdefault(row["label"], Setting(row["label"], row, {m: [] for m in METRICS},
                                                     {c: [] for c in row["success_by_context"]}))
            for m in METRICS:
                s.values[m].append(row[m])
            for c, v in row["success_by_context"].items():
                s.by_context[c].append(v)
    return out


def models(results: dict) -> list[str]:
    return list(results["replicates"][0]["models"])


def best(tab: Table, methods: Iterable[str], leave_out: int | None = None) -> str:
    """The label of the best setting among ``methods``, judged on every replicate but ``leave_out``."""
    methods = tuple(methods)
    own = [s for s in tab.values() if s.method in methods]
    if not own:
        raise ValueError(f"no setting of {methods}")
    return max(own, key=lambda s: (s.mean("success", leave_out),
                                   s.mean("fidelity", leave_out) + s.mean("alignment", leave_out))).label


def best_per_method(tab: Table) -> dict[str, str]:
    """Each method's best setting (judged on all replicates): method value -> label."""
    present = {s.method for s in tab.values()}
    return {m.value: best(tab, (m.value,)) for m in Method if m.value in present}


def paired(tab: Table, label_a: str, label_b: str, metric: str) -> Estimate:
    """``metric`` of setting a minus setting b, replicate by replicate."""
    a, b = tab[label_a].values[metric], tab[label_b].values[metric]
    return estimate([x - y for x, y in zip(a, b, strict=True)])


@dataclass
class Tuned:
    """A paired difference between two methods, each at its best setting chosen on the other replicates."""

    difference: Estimate
    chosen_a: list[str]  # the setting scored in each replicate
    chosen_b: list[str]


def tuned_difference(tab: Table, methods_a: Iterable[str], methods_b: Iterable[str], metric: str = "success") -> Tuned:
    """Best of ``methods_a`` minus best of ``methods_b`` in ``metric``, each best chosen leaving the scored replicate out.

    With one replicate there is nothing to leave out: the best is chosen on it (and no interval is given).
    """
    methods_a, methods_b = tuple(methods_a), tuple(methods_b)
    n = len(next(iter(tab.values())).values[metric])
    diffs, chosen_a, chosen_b = [], [], []
    for r in range(n):
        leave = r if n > 1 else None
        a, b = best(tab, methods_a, leave), best(tab, methods_b, leave)
        diffs.append(tab[a].values[metric][r] - tab[b].values[metric][r])
        chosen_a.append(a)
        chosen_b.append(b)
    return Tuned(estimate(diffs), chosen_a, chosen_b)


def mean_over(tab: Table, pairs: list[tuple[str, str]], metric: str) -> Estimate:
    """The mean over ``pairs`` of (a - b) in ``metric``, taken replicate by replicate, with its interval."""
    n = len(next(iter(tab.values())).values[metric])
    diffs = [sum(tab[a].values[metric][r] - tab[b].values[metric][r] for a, b in pairs) / len(pairs) for r in range(n)]
    return estimate(diffs)


def pooled(results: dict) -> Table:
    """Every setting with its scores averaged over the fine-tunes, replicate by replicate (one recommendation for both)."""
    tables = [table(results, m) for m in models(results)]
    out: Table = {}
    for label, s in tables[0].items():
        n = len(s.values["success"])
        values = {m: [sum(t[label].values[m][r] for t in tables) / len(tables) for r in range(n)] for m in METRICS}
        contexts = {c: [sum(t[label].by_context[c][r] for t in tables) / len(tables) for r in range(n)]
                    for c in s.by_context}
        out[label] = Setting(label, s.row, values, contexts)
    return out
