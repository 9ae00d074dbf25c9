"""The claims RESULTS.md makes, computed from a run's replicates, and how two runs compare.

A claim is a sentence with figures and a *verdict*: what the interval of a paired
difference says about its sign (``stats.Verdict``), or for the suggested defaults, the
two-way settings that the data cannot tell apart from the best one. The figures of a
rerun on another machine differ; the verdicts are what it should reproduce, and
``agreement`` checks them claim by claim. A claim in ``ONE_SIDED`` only says whether a
difference is shown lower: its "higher" was not reproduced by a run at another thread count.
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


def fmt(e: Estimate, points: bool = False, signed: bool = False) -> str:
    """``e`` as "mean [lo, hi]": success as percentage points, other scores to two decimals."""
    scale, digits = (100, 0) if points else (1, 2)
    sign = "+" if signed else ""

    def one(v: float) -> str:
        return f"{round(scale * v, digits) + 0.0:{sign}.{digits}f}"  # + 0.0: no "-0"

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


def _chosen(labels: list[str]) -> str:
    """The settings chosen across the leave-one-replicate-out folds, most often chosen first."""
    counts: dict[str, int] = {}
    for label in labels:
        counts[label] = counts.get(label, 0) + 1
    ranked = sorted(counts.items(), key=lambda kv: -kv[1])
    if len(ranked) == 1:
        return f"`{ranked[0][0]}`" + (" in every fold" if len(labels) > 1 else "")
    return ", ".join(f"`{label}` in {n} of {len(labels)}" for label, n in ranked)


@dataclass
class Comparison:
    """A paired difference between two ways of sampling, and the words for its sign."""

    id: str
    lead: str  # what is subtracted from what
    difference: Estimate
    higher: str
    lower: str
    points: bool  # a difference in success, written in percentage points
    chosen: str = ""  # for best-against-best: the settings each fold scored
    one_sided: bool = False  # claim only that it is not shown lower (see ONE_SIDED)

    @property
    def verdict(self) -> str:
        """The verdict a rerun must reproduce: the interval's, or for a one-sided claim, lower or not."""
        v = self.difference.verdict
        if self.one_sided and v in (Verdict.HIGHER, Verdict.WITHIN):
            return NOT_SHOWN_LOWER
        return v.value

    def sentence(self) -> str:
        text = f"{self.lead}: {fmt(self.difference, self.points, signed=True)}; "
        if self.verdict == NOT_SHOWN_LOWER:
            text += f"{self.lower}: not shown (the interval is not below 0). {ONE_SIDED_WHY}"
        else:
            text += f"{verdict_words(self.difference, self.higher, self.lower)}."
        return text + (f" Chosen: {self.chosen}." if self.chosen else "")


# Claims stated one-sided: only "not shown lower", never "higher". Personalization guidance's best against
# CFG's best has an interval whose lower end sits near 0: the committed run (1 thread) put it above 0 and
# a run with 2 threads, same seeds, below (RESULTS.md, "Between machines"). A gain is therefore not claimed;
# what both runs support is that no loss is shown.
ONE_SIDED = ("PG vs CFG, success",)
NOT_SHOWN_LOWER = "not shown lower"
ONE_SIDED_WHY = ("A gain is not claimed: this interval's lower end is near 0, and runs at different thread counts "
                 "put it on either side of 0 (see \"Between machines\").")


def comparisons(tab: Table, omegas: list[float], lambdas: list[float]) -> list[Comparison]:
    """The study's questions, asked of one table (a fine-tune's, or both pooled)."""
    ft = tab[FINETUNED]
    out = [Comparison(
        "the failure",
        f"Without guidance, the fine-tuned model shows the prompted background in {fmt(ft.estimate('alignment'))} of "
        f"the ring pixels in new contexts, against {fmt(ft.estimate('alignment_training_context'))} in the training "
        "context; new minus training",
        estimate([a - b for a, b in zip(ft.values["alignment"], ft.values["alignment_training_context"], strict=True)]),
        "higher in new contexts", "lower in new contexts", points=False,
    )]
    lams = "{" + ", ".join(f"{lam:g}" for lam in lambdas) + "}"
    low = min(omegas)
    same_lambda = [
        ("autoguidance vs CFG, alignment", AUTOGUIDANCE + " lambda={lam:g}", "autoguidance", "alignment"),
        (f"omega {low:g} vs CFG, alignment", f"{TWO_WAY} omega={low:g} lambda={{lam:g}}", f"two-way at omega = {low:g}",
         "alignment"),
        (f"omega {low:g} vs CFG, fidelity", f"{TWO_WAY} omega={low:g} lambda={{lam:g}}", f"two-way at omega = {low:g}",
         "fidelity"),
    ]
    for id_, pattern, name, metric in same_lambda:
        pairs = [(pattern.format(lam=lam), f"{CFG} lambda={lam:g}") for lam in lambdas]
        out.append(Comparison(
            id_, f"{name[0].upper() + name[1:]} minus CFG at the same lambda, {metric} (mean over lambda in {lams})",
            aggregate.mean_over(tab, pairs, metric), f"{metric} higher with {name}", f"{metric} lower with {name}",
            points=False,
        ))
    best_against_best = [
        ("PG vs CFG, success", PG_METHODS, (CFG,), "personalization guidance (any of its forms)", "CFG"),
        ("two-way PG vs CFG, success", (TWO_WAY,), (CFG,), "two-way personalization guidance (the paper's)", "CFG"),
        ("PG vs autoguidance, success", PG_METHODS, (AUTOGUIDANCE,), "personalization guidance (any of its forms)",
         "autoguidance"),
    ]
    for id_, a, b, name_a, name_b in best_against_best:
        tuned = aggregate.tuned_difference(tab, a, b)
        out.append(Comparison(
            id_, f"Success of {name_a} minus {name_b}, each at its best setting chosen on the other replicates",
            tuned.difference, f"{name_a} higher", f"{name_a} lower", points=True,
            chosen=f"{_chosen(tuned.chosen_a)}; {_chosen(tuned.chosen_b)}", one_sided=id_ in ONE_SIDED,
        ))
    return out


def defaults_claim(tab: Table) -> Claim:
    """The two-way setting (CFG as omega = 1) with the highest success in ``tab``, and the settings it cannot be told from."""
    grid = {label: s for label, s in tab.items() if s.method in (TWO_WAY, CFG)}
    top = aggregate.best(grid, (TWO_WAY, CFG))
    equals = [top] + [label for label in grid
                      if label != top and aggregate.paired(grid, label, top, "success").verdict != Verdict.LOWER]
    text = (f"The two-way setting with the highest mean success is {_omega_lambda(grid[top])} "
            f"({fmt(grid[top].estimate('success'), points=True)}). ")
    others = [_omega_lambda(grid[label]) for label in equals if label != top]
    if others:
        text += (f"The data cannot tell it apart (paired difference in success within its interval) from "
                 f"{len(others)} other setting(s) of the grid: {'; '.join(others)}. So no single default is "
                 "established: which of these comes first can change on a rerun.")
    else:
        text += "Every other setting of the grid is lower, outside the interval."
    return Claim(DEFAULTS_ID, text, "best, then its equals: " + ", ".join(equals), grid[top].estimate("success"),
                 equals)


def _omega_lambda(s: aggregate.Setting) -> str:
    omega = 1.0 if s.method == CFG else s.row["omega"]["start"]
    return f"omega {omega:g}, lambda {s.row['lambda']:g}" + (" (plain CFG)" if s.method == CFG else "")


def claims(results: dict) -> list[Claim]:
    """Every claim of a run: the comparisons on both fine-tunes pooled (averaged replicate by replicate), then the defaults.

    Pooling asks each question once, of the two fine-tunes together: fewer claims, each on
    less noisy numbers. Each fine-tune's own figures are in the report's tables.
    """
    config = results["config"]
    tab = aggregate.pooled(results)
    out = [Claim(c.id, c.sentence(), c.verdict, c.difference, points=c.points)
           for c in comparisons(tab, config["omegas"], config["lambdas"])]
    out.append(defaults_claim(tab))
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
