"""The claims RESULTS.md makes, computed from a run's replicates, and how two runs compare.

A claim is a sentence with figures and a *verdict*: what the interval of a paired
difference says about its sign (``stats.Verdict``), or for the suggested defaults, the
two-way settings that the data cannot tell apart from the best one. The figures of a
rerun on another machine differ; the verdicts are what it should reproduce, and
``agreement`` checks them claim by claim.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from . import aggregate
from .aggregate import PG_METHODS, Table
from .guiders import Method
from .stats import Estimate, Verdict, estimate

CFG, AUTOGUIDANCE, FINETUNED, TWO_WAY = (m.value for m in (Method.CFG, Method.AUTOGUIDANCE, Method.FINETUNED, Method.TWO_WAY))
DEFAULTS_ID = "suggested defaults"


@dataclass
class Claim:
    """A sentence and what a rerun must reproduce of it: the verdict (and, for the defaults, the set of equals)."""

    id: str
    text: str
    verdict: str
    estimate: Estimate | None = None
    members: list[str] = field(default_factory=list)
    points: bool = False  # the estimate is a difference in success, written in percentage points
    group: str = ""  # the fine-tune it is about, or "" for both


def fmt(e: Estimate, points: bool = False, signed: bool = False) -> str:
    """``e`` as "mean [lo, hi]": success as percentage points, other scores to two decimals."""
    scale, digits = (100, 0) if points else (1, 2)
    sign = "+" if signed else ""

    def one(v: float) -> str:
        return f"{scale * v:{sign}.{digits}f}"

    text = one(e.mean) + (" points" if points and signed else "%" if points else "")
    if e.lo is None:
        return text + " (one replicate: no interval)"
    return f"{text} [{one(e.lo)}, {one(e.hi)}]"


def verdict_words(e: Estimate, higher: str, lower: str) -> str:
    v = e.verdict
    if v == Verdict.HIGHER:
        return f"{higher} (the interval excludes 0)"
    if v == Verdict.LOWER:
        return f"{lower} (the interval excludes 0)"
    if v == Verdict.WITHIN:
        return "no difference shown: 0 is within the interval"
    return "no interval with one replicate"


def _difference(id_: str, lead: str, e: Estimate, higher: str, lower: str, points: bool = True) -> Claim:
    return Claim(id_, f"{lead}: {fmt(e, points, signed=True)}; {verdict_words(e, higher, lower)}.", e.verdict.value, e,
                 points=points)


def _chosen(labels: list[str]) -> str:
    """The settings chosen across the leave-one-replicate-out folds, most often chosen first."""
    counts: dict[str, int] = {}
    for label in labels:
        counts[label] = counts.get(label, 0) + 1
    ranked = sorted(counts.items(), key=lambda kv: -kv[1])
    if len(ranked) == 1:
        return f"`{ranked[0][0]}`" + (" in every fold" if len(labels) > 1 else "")
    return ", ".join(f"`{label}` in {n} of {len(labels)}" for label, n in ranked)


def model_claims(name: str, tab: Table, omegas: list[float], lambdas: list[float]) -> list[Claim]:
    """The claims about one fine-tune."""
    out = []
    ft = tab[FINETUNED]
    gap = estimate([a - b for a, b in zip(ft.values["alignment"], ft.values["alignment_training_context"],
                                                     strict=True)])
    out.append(_difference(
        f"{name}: the failure",
        f"Without guidance, the fine-tuned model shows the prompted background in "
        f"{fmt(ft.estimate('alignment'))} of the ring pixels in new contexts, against "
        f"{fmt(ft.estimate('alignment_training_context'))} in the training context; new minus training",
        gap, "higher in new contexts", "lower in new contexts", points=False,
    ))
    comparisons = [
        ("CFG vs no guidance", (CFG,), (FINETUNED,), "CFG", "the fine-tuned model alone"),
        ("autoguidance vs CFG", (AUTOGUIDANCE,), (CFG,), "autoguidance", "CFG"),
        ("PG vs CFG", PG_METHODS, (CFG,), "personalization guidance (any of its forms)", "CFG"),
        ("two-way PG vs CFG", (TWO_WAY,), (CFG,), "two-way personalization guidance (the paper's)", "CFG"),
        ("PG vs autoguidance", PG_METHODS, (AUTOGUIDANCE,), "personalization guidance (any of its forms)",
         "autoguidance"),
    ]
    for id_, a, b, name_a, name_b in comparisons:
        tuned = aggregate.tuned_difference(tab, a, b)
        claim = _difference(
            f"{name}: {id_}",
            f"Success of {name_a} minus {name_b}, each at its best setting chosen on the other replicates",
            tuned.difference, f"{name_a} higher", f"{name_a} lower",
        )
        claim.text += f" Chosen: {_chosen(tuned.chosen_a)}; {_chosen(tuned.chosen_b)}."
        out.append(claim)
    low = min(omegas)
    pairs = [(f"{TWO_WAY} omega={low:g} lambda={lam:g}", f"{CFG} lambda={lam:g}") for lam in lambdas]
    for metric in ("alignment", "fidelity"):
        e = aggregate.mean_over(tab, pairs, metric)
        out.append(_difference(
            f"{name}: omega {low:g} {metric}",
            f"Two-way at omega = {low:g} minus CFG at the same lambda, {metric} (mean over lambda in "
            f"{{{', '.join(f'{lam:g}' for lam in lambdas)}}})",
            e, f"{metric} higher at omega {low:g}", f"{metric} lower at omega {low:g}", points=False,
        ))
    return out


def defaults_claim(results: dict) -> Claim:
    """The two-way setting (CFG as omega = 1) with the highest success averaged over the fine-tunes, and its equals."""
    tab = aggregate.two_way_over_models(results)
    top = aggregate.best(tab, (TWO_WAY, CFG))
    equals = [top] + [label for label in tab
                      if label != top and aggregate.paired(tab, label, top, "success").verdict != Verdict.LOWER]
    text = (f"Averaged over both fine-tunes, the two-way setting with the highest mean success is {_omega_lambda(tab[top])} "
            f"({fmt(tab[top].estimate('success'), points=True)}). ")
    others = [_omega_lambda(tab[label]) for label in equals if label != top]
    if others:
        text += (f"The data cannot tell it apart (paired difference in success within its interval) from "
                 f"{len(others)} other setting(s) of the grid: {'; '.join(others)}.")
    else:
        text += "Every other setting of the grid is lower, outside the interval."
    return Claim(DEFAULTS_ID, text, "best, then its equals: " + ", ".join(equals), tab[top].estimate("success"), equals)


def _omega_lambda(s: aggregate.Setting) -> str:
    omega = 1.0 if s.method == CFG else s.row["omega"]["start"]
    return f"omega {omega:g}, lambda {s.row['lambda']:g}" + (" (plain CFG)" if s.method == CFG else "")


def claims(results: dict) -> list[Claim]:
    """Every claim of a run, model by model, then the suggested defaults."""
    config = results["config"]
    out = []
    for name in aggregate.models(results):
        for c in model_claims(name, aggregate.table(results, name), config["omegas"], config["lambdas"]):
            c.group = name
            out.append(c)
    out.append(defaults_claim(results))
    return out


def agree(a: Claim, b: Claim) -> bool:
    """Whether two runs' versions of one claim agree: the same verdict; for the defaults, each run's best among the other's equals."""
    if a.id == DEFAULTS_ID:
        return a.members[0] in b.members and b.members[0] in a.members if a.members and b.members else False
    return a.verdict == b.verdict


def agreement(results_a: dict, results_b: dict) -> list[tuple[Claim, Claim | None, bool]]:
    """Each claim of run a with run b's version of it (None where b lacks it) and whether they agree."""
    by_id = {c.id: c for c in claims(results_b)}
    out = []
    for c in claims(results_a):
        other = by_id.get(c.id)
        out.append((c, other, other is not None and agree(c, other)))
    return out
