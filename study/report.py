"""RESULTS.md from the results of a run: claims with their intervals, and tables of replicate means."""

from __future__ import annotations

from . import aggregate, claims, world
from .aggregate import Table
from .guiders import Method
from .stats import LEVEL, Estimate, t_quantile


def _list(values: list[float]) -> str:
    return "{" + ", ".join(f"{v:g}" for v in values) + "}"


def _pm(e: Estimate, digits: int = 2) -> str:
    """``mean ± half-width`` (the mean alone with one replicate)."""
    if e.half_width is None:
        return f"{e.mean:.{digits}f}"
    return f"{e.mean:.{digits}f} ± {e.half_width:.{digits}f}"


def _table(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines)


ROW_HEADER = [
    "setting", "success", "fidelity", "pattern", "alignment", "diversity", "fidelity (training context)", "evals/step",
]


def _row_cells(s: aggregate.Setting) -> list[str]:
    return [
        s.label, _pm(s.estimate("success")), _pm(s.estimate("fidelity")), _pm(s.estimate("pattern_fidelity")),
        _pm(s.estimate("alignment")), _pm(s.estimate("diversity"), 3), _pm(s.estimate("fidelity_training_context")),
        f"{s.row['evaluations_per_step']:g}",
    ]


def best_table(tab: Table) -> str:
    """Each method's best setting (on the means over replicates)."""
    body = [_row_cells(tab[label]) for label in aggregate.best_per_method(tab).values()]
    return _table(["best setting of each method"] + ROW_HEADER[1:], body)


def context_table(tab: Table, context: str) -> str:
    """Success of each method's best setting, context by context (the training context last)."""
    contexts = [c for c in next(iter(tab.values())).by_context if c != context] + [context]
    body = [
        [label] + [_pm(aggregate.estimate(tab[label].by_context[c])) for c in contexts]
        for label in aggregate.best_per_method(tab).values()
    ]
    return _table(["best setting"] + contexts[:-1] + [f"{contexts[-1]} (training)"], body)


def grid_table(tab: Table, config: dict) -> str:
    """Two-way success ± half-width (fidelity / alignment means) over omega x lambda, with CFG as omega = 1."""
    cells = {(s.row["omega"]["start"], s.row["lambda"]): s for s in tab.values() if s.method == Method.TWO_WAY.value}
    cells.update({(1.0, s.row["lambda"]): s for s in tab.values() if s.method == Method.CFG.value})
    body = []
    for omega in list(config["omegas"]) + [1.0]:
        line = [f"omega = {omega:g}" + (" (CFG)" if omega == 1.0 else "")]
        for lam in config["lambdas"]:
            s = cells.get((omega, lam))
            line.append("-" if s is None else
                        f"{_pm(s.estimate('success'))} ({s.mean('fidelity'):.2f} / {s.mean('alignment'):.2f})")
        body.append(line)
    return _table(["two-way"] + [f"lambda = {lam:g}" for lam in config["lambdas"]], body)


def _scores(results: dict) -> dict[tuple, float]:
    """Every score of every replicate (settings' metrics, success by context, text following), by where it is."""
    out = {}
    for r, rep in enumerate(results["replicates"]):
        for name, model in rep["models"].items():
            for row in model["settings"]:
                out |= {(r, name, row["label"], m): row[m] for m in aggregate.METRICS}
                out |= {(r, name, row["label"], c): v for c, v in row["success_by_context"].items()}
        for name, scores in rep["text_following"].items():
            out |= {(r, "text following", name, k): v for k, v in scores.items()}
    return out


def spread(a: dict, b: dict) -> dict:
    """How far two runs of the same settings differ: per-replicate scores, replicate means, claims."""
    scores_a, scores_b = _scores(a), _scores(b)
    shared = scores_a.keys() & scores_b.keys()
    differ = sum(scores_a[k] != scores_b[k] for k in shared)
    success_gaps, replicate_gaps, mean_gaps, beyond = [], [], [], 0
    for name in aggregate.models(a):
        tab_a, tab_b = aggregate.table(a, name), aggregate.table(b, name)
        for label, s in tab_a.items():
            v = s.values["success"]
            replicate_gaps += [abs(v[i] - v[j]) for i in range(len(v)) for j in range(i + 1, len(v))]
            if label not in tab_b:
                continue
            other = tab_b[label]
            success_gaps += [abs(x - y) for x, y in zip(s.values["success"], other.values["success"], strict=False)]
            ea, eb = s.estimate("success"), other.estimate("success")
            mean_gaps.append(abs(ea.mean - eb.mean))
            half = max(ea.half_width or 0.0, eb.half_width or 0.0)
            beyond += abs(ea.mean - eb.mean) > half
    return {
        "values": len(shared), "differ": differ,
        "success_mean_gap": sum(success_gaps) / len(success_gaps), "success_max_gap": max(success_gaps),
        "replicate_mean_gap": sum(replicate_gaps) / len(replicate_gaps) if replicate_gaps else None,
        "mean_max_gap": max(mean_gaps), "means": len(mean_gaps), "means_beyond_half_width": beyond,
    }


def load_text(results: dict) -> str:
    """How busy the machine was during a run (recorded since the load was found to double wall times)."""
    m = results.get("machine")
    if m is None:
        return ("The machine's load was not recorded in this run's results.json (docs/study.md gives "
                "it); wall times depend on it, the figures do not.")
    return (f"Load average (1, 5, 15 min) on its {m['cpus']} CPU(s): {', '.join(f'{v:.1f}' for v in m['load_start'])} "
            f"at the start, {', '.join(f'{v:.1f}' for v in m['load_end'])} at the end (this run itself adds about "
            f"{results['torch']['workers'] * results['torch']['threads']}); {m['cpu_s']:.0f} CPU seconds in all.")


def _runtime_line(results: dict) -> str:
    t, timings, m = results["torch"], results["timings_s"], results.get("machine")
    load = ("load not recorded in its results.json" if m is None else
            f"1-minute load average {m['load_start'][0]:.1f} at the start, {m['load_end'][0]:.1f} at the end")
    return (f"{timings['total'] / 60:.1f} min with {t['workers']} worker(s) x {t['threads']} thread(s) "
            f"(pre-training {timings['pretraining']:.0f} s summed over replicates; {load})")


RUNTIME = ("threads", "workers")  # settings of how a run is executed, not of what it computes


def machine_section(results: dict, compare: dict | None) -> str:
    """What varies between machines, and, with another run's results, how much it varied."""
    text = MACHINE.format(threads=results["torch"]["threads"], version=results["torch"]["version"])
    if compare is None:
        return text + ("\nNo second run was given to this report: `--compare other/results.json` measures the spread "
                       "between this run and another one of the same settings.\n")
    s = spread(results, compare)
    same = {k: v for k, v in results["config"].items() if k not in RUNTIME} == \
           {k: v for k, v in compare["config"].items() if k not in RUNTIME}
    text += (
        f"\n**Measured.** This run ({results['torch']['threads']} thread(s), torch {results['torch']['version']}) "
        f"against another run of {'the same settings' if same else 'other settings (the comparison is not like for like)'} "
        f"({compare['torch']['threads']} thread(s), torch {compare['torch']['version']}"
        + (f"; its results: `{compare['source']}`" if "source" in compare else "")
        + "), replicate by replicate "
        f"(the same seeds): {s['differ']} of {s['values']} per-replicate scores differ. A setting's success in one "
        f"replicate differs by {100 * s['success_mean_gap']:.1f} points on average, at most "
        f"{100 * s['success_max_gap']:.0f}"
        + ("" if s["replicate_mean_gap"] is None else
           f" (two replicates of this run, with different seeds, differ by {100 * s['replicate_mean_gap']:.1f} points "
           "on average)")
        + ". "
        f"Replicate means of success differ by at most {100 * s['mean_max_gap']:.0f} points; "
        f"{s['means_beyond_half_width']} of {s['means']} settings' means differ by more than their interval's "
        "half-width.\n\n"
    )
    rows, agree = [], 0
    for mine, theirs, ok in claims.agreement(results, compare):
        agree += ok
        rows.append([mine.id, _verdict_cell(mine), "-" if theirs is None else _verdict_cell(theirs),
                     "yes" if ok else "**no**"])
    text += (f"Wall clock: this run {_runtime_line(results)}; the other run {_runtime_line(compare)}. "
             "Wall times depend on the machine, the thread layout and the load from other jobs.\n\n")
    text += f"The claims of the two runs agree in {agree} of {len(rows)} cases:\n\n"
    text += _table(["claim", f"this run ({results['torch']['threads']} thread(s))",
                    f"other run ({compare['torch']['threads']} thread(s))", "agree"], rows) + "\n"
    return text


def _verdict_cell(c: claims.Claim) -> str:
    if c.id == claims.DEFAULTS_ID:
        return f"best {c.members[0]}; {len(c.members) - 1} equal(s)"
    return f"{c.verdict}: {claims.fmt(c.estimate, points=c.points, signed=True)}"


def by_fine_tune(results: dict) -> str:
    """The claims' comparisons asked of each fine-tune alone: figures with intervals, not claims."""
    config = results["config"]
    names = aggregate.models(results)
    columns = [claims.comparisons(aggregate.table(results, n), config["omegas"], config["lambdas"]) for n in names]
    columns.append(claims.comparisons(aggregate.pooled(results), config["omegas"], config["lambdas"]))
    body = [[rows[0].id] + [claims.fmt(c.difference, c.points, signed=True) for c in rows]
            for rows in zip(*columns, strict=True)]
    return ("The same comparisons for each fine-tune alone (figures, not claims: each rests on half the data):\n\n"
            + _table(["comparison"] + names + ["both (the claims)"], body) + "\n")


def markdown(results: dict, compare: dict | None = None) -> str:
    """The whole RESULTS.md; ``compare`` (another run's results) adds the measured spread between the runs."""
    config, timings = results["config"], results["timings_s"]
    reps = results["replicates"]
    n = len(reps)
    parts = [HEADER.format(
        total=timings["total"] / 60, threads=results["torch"]["threads"], version=results["torch"]["version"],
        workers=results["torch"]["workers"],
        cached=sum(r["base_loaded_from_cache"] for r in reps), n=n, seeds_list=", ".join(str(r["seed"]) for r in reps),
        pretraining=timings["pretraining"], personalization=timings["personalization"], sampling=timings["sampling"],
        seeds=config["seeds"], steps=config["sample_steps"], context=config["context"],
        threshold=config["success_threshold"], params=results["parameters"], pretrain_steps=config["pretrain_steps"],
        pretrain_batch=config["pretrain_batch"], drop_prompt=config["drop_prompt"], photos=config["photos"],
        ft_steps=config["ft_steps"], ft_lr=config["ft_lr"], lora_rank=config["lora_rank"],
        lora_steps=config["lora_steps"], lora_lr=config["lora_lr"], omegas=_list(config["omegas"]),
        three_way_omega=config["three_way_omega"], three_way_lambda_p=_list(config["three_way_lambda_p"]),
        lambdas=_list(config["lambdas"]), level=LEVEL, new=config["seeds"] * (len(world.BACKGROUNDS) - 1),
        t=t_quantile(0.5 + LEVEL / 2, n - 1) if n > 1 else float("nan"), df=n - 1, load=load_text(results),
    )]
    parts.append("## Claims\n\nEach claim is computed from the replicates by `claims.py`, on the two fine-tunes "
                 "pooled (their scores averaged within each replicate); its verdict is what a rerun should reproduce, "
                 "its figures may move within their intervals. Success differences are in percentage points.\n")
    parts += [f"{i}. {c.text}" for i, c in enumerate(claims.claims(results), 1)]
    parts.append("\n" + by_fine_tune(results))
    parts.append(machine_section(results, compare))
    tf_names = list(reps[0]["text_following"])
    tf_body = [[name] + [_pm(aggregate.estimate([r["text_following"][name][k] for r in reps]))
                         for k in ("shape", "colour", "background")] for name in tf_names]
    parts.append("## Sanity checks\n\nPrompts without the subject (every shape x colour x background, one picture each, "
                 f"CFG lambda = {config['drift_lambda']:g}): the fraction of pictures that show what was asked.\n")
    parts.append(_table(["model", "shape", "colour", "background"], tf_body) + "\n")
    for name in aggregate.models(results):
        tab = aggregate.table(results, name)
        parts.append(f"## {name}\n\n### Each method's best setting (new contexts)\n\nBest by mean success over the "
                     "replicates, on the same replicates: these figures favour methods with many settings (see the "
                     f"claims for the fair comparison).\n\n{best_table(tab)}\n")
        parts.append(f"### Success by context\n\n{context_table(tab, config['context'])}\n")
        parts.append(f"### Two-way grid: success (fidelity / alignment)\n\n{grid_table(tab, config)}\n")
        parts.append("<details><summary>Every setting</summary>\n\n"
                     + _table(ROW_HEADER, [_row_cells(s) for s in tab.values()]) + "\n\n</details>\n")
    parts.append(LIMITS.format(params=results["parameters"], pretrain_steps=config["pretrain_steps"], n=n))
    return "\n".join(parts)


HEADER = """# Personalization guidance on a synthetic world: results

Written by `python -m study.run` from `results.json`; do not edit by hand. The
figures are `frontier.png` (each method's fidelity/alignment frontier, with the spread
over replicates) and `samples_full.png`, `samples_lora.png` (pictures of the first replicate).

## How to reproduce

```
python -m study.run                          # from the repository root: this file, results.json, PNGs
python -m study.run --replicates 10          # more replicates: narrower intervals, proportionally longer
python -m study.run --threads 2 --workers 1 --out /tmp/t2  # another thread count (see "Between machines")
python -m study.run --report-only --compare /tmp/t2/results.json  # this file, with the measured spread
python -m study.run --report-only --compare study/results_threads2.json  # as committed: against a 2-thread run
python -m study.run --no-cache               # pre-train again even if study/_cache/ holds the base models
python -m study.run --quick --out /tmp/quick # the reduced run of the test suite (seconds)
```

This run: {n} replicates (seeds {seeds_list}), {total:.1f} minutes of wall clock with {workers}
worker process(es) of {threads} torch thread(s) each, torch {version}. Summed over replicates:
pre-training {pretraining:.0f} s ({cached} of {n} base models loaded from study/_cache/),
personalization {personalization:.0f} s, sampling and scoring {sampling:.0f} s. {load}

## How to read the figures

A *replicate* is one independent run of the whole pipeline: its own pre-training, its own
fine-tunes, its own sampling noise (the same noise for every method within it). Every figure
is a mean over the {n} replicates, given as `mean ± half-width` or `mean [lo, hi]`, where the
interval is a {level:.0%} Student-t interval on the replicate means (t = {t:.2f} with {df}
degrees of freedom). Each replicate's mean over its pictures already holds both sources of
variation, the training and the pictures; `stats.py` says why this is used rather than a
bootstrap. Comparisons are paired: the difference is taken within each replicate, then given
its interval. When two methods are compared at their best settings, each replicate is scored
at the settings that were best on the *other* replicates, so that a method with many settings
is not favoured by picking its luckiest. A difference whose interval contains 0 is reported
as such: the study does not show it.

## Setup

- **World** (`world.py`): 16x16 pictures of one object (square, circle, triangle or cross;
  solid, checkered or striped; six colours) on one of five backgrounds, prompted by four
  tokens: a name, a shape, a colour, a background. Three names are known objects shown in
  every context; "sks" means nothing to the base model. The subject, a square checkered
  magenta and cyan, never appears in pre-training.
- **Base model** (`model.py`): a {params:,}-parameter UNet with cross-attention to the tokens,
  EDM preconditioning, {pretrain_steps} steps of batch {pretrain_batch} with the prompt dropped
  to null {drop_prompt:.0%} of the time.
- **Personalization** (`train.py`, `lora.py`): {photos} photos of the subject on "{context}",
  prompt "sks square on {context}", DreamBooth without prior preservation. Full fine-tune:
  {ft_steps} steps at lr {ft_lr:g}. LoRA: rank {lora_rank} on every Linear and Conv2d,
  {lora_steps} steps at lr {lora_lr:g}, embeddings frozen.
- **Methods** (`guiders.py`, through the `guidance` package): CFG on the fine-tuned model;
  autoguidance (weak model: the base with the same prompt); personalization guidance two-way
  (omega in {omegas}), with omega scheduled over the run, and three-way (omega =
  {three_way_omega:g}, lambda_p in {three_way_lambda_p}); every lambda in {lambdas}.

## What is measured

Prompts "sks square on <context>", {seeds} pictures each per replicate, {steps} Euler steps.
The subject was photographed only on "{context}"; the other four backgrounds are the *new
contexts* ({new} pictures per replicate), and every number below is over them unless it says
"training context".

- **fidelity**: for the best-fitting square (any place, any size), the pixels showing the
  subject's colour where the subject has it (magenta and cyan quadrants), divided by the
  square's pixels plus any magenta or cyan pixels outside it. 1 is the subject and nothing
  else; a plain object scores at most 0.5, a larger checkered blob less than 1.
- **pattern**: the same without the outside term: is the subject's pattern there at all,
  however much else is painted magenta and cyan.
- **alignment**: the fraction of the outer ring of pixels showing the prompted background.
- **success**: the fraction of pictures with fidelity and alignment both >= {threshold:g}.
- **diversity**: mean pairwise RMS pixel distance among the pictures of one prompt (0 to 1).
- **evals/step**: model evaluations per sampling step (CFG: 2).
"""

MACHINE = """## Between machines

The figures depend on the machine. Torch's CPU kernels sum in an order that depends on the
thread count, the CPU's vector instructions and the torch build; a difference in the last bit
of one weight grows, over hundreds of training steps, into a differently trained model. So
every per-replicate figure can change on another machine (or with another `--threads`): the
trained models, and so the pictures and their scores. What a rerun should reproduce are the
verdicts of the claims above; the means may move within their intervals. The same machine,
thread count and torch give the same numbers. This run used {threads} thread(s), torch {version}.
Wall times vary more than the figures: with the CPU, the split into workers and threads, and
above all the load from other jobs on the same cores.
"""

LIMITS = """## Limits of the evidence

16x16 pictures and a {params:,}-parameter UNet pre-trained for {pretrain_steps} steps: the
model draws colours and backgrounds, not distinct shapes (see "Sanity checks"), so the
subject is recognised by its coloured checkerboard. {n} replicates: an effect smaller than the
intervals above is not ruled out, only not shown; `--replicates` buys narrower intervals. A
model this small says little about how far omega can drop in Stable Diffusion, and nothing
about the paper's DreamBench figures.
"""
