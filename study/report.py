"""RESULTS.md from the results of a run: tables, and findings computed from the numbers."""

from __future__ import annotations

from . import world
from .guiders import Method

PG_METHODS = (Method.TWO_WAY.value, Method.SCHEDULED.value, Method.THREE_WAY.value)
BASELINES = (Method.CFG.value, Method.AUTOGUIDANCE.value)
ALIGNMENT_LEVELS = (0.5, 0.75, 0.9)


def _best(rows: list[dict], methods: tuple[str, ...]) -> dict | None:
    """The row of ``methods`` with the highest success rate (ties: higher fidelity + alignment)."""
    own = [r for r in rows if r["method"] in methods]
    return max(own, key=lambda r: (r["success"], r["fidelity"] + r["alignment"]), default=None)


def _fidelity_at(rows: list[dict], method: str, level: float) -> float | None:
    """The best fidelity ``method`` reaches with alignment at least ``level`` (a point on its frontier)."""
    values = [r["fidelity"] for r in rows if r["method"] == method and r["alignment"] >= level]
    return max(values, default=None)


def _list(values: list[float]) -> str:
    return "{" + ", ".join(f"{v:g}" for v in values) + "}"


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _table(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines)


def _row_cells(r: dict) -> list[str]:
    return [
        r["label"], _fmt(r["success"]), _fmt(r["fidelity"]), _fmt(r["pattern_fidelity"]), _fmt(r["alignment"]),
        _fmt(r["diversity"], 3), _fmt(r["fidelity_training_context"]), f"{r['evaluations_per_step']:g}",
    ]


ROW_HEADER = [
    "setting", "success", "fidelity", "pattern", "alignment", "diversity", "fidelity (training context)", "evals/step",
]


def best_table(rows: list[dict]) -> str:
    """Each method's best setting."""
    body = [_row_cells(r) for m in Method if (r := _best(rows, (m.value,))) is not None]
    return _table(["best setting of each method"] + ROW_HEADER[1:], body)


def context_table(rows: list[dict], config: dict) -> str:
    """Success of each method's best setting, context by context (the training context last)."""
    contexts = [c for c in rows[0]["success_by_context"] if c != config["context"]] + [config["context"]]
    body = [
        [r["label"]] + [_fmt(r["success_by_context"][c]) for c in contexts]
        for m in Method
        if (r := _best(rows, (m.value,))) is not None
    ]
    return _table(["best setting"] + contexts[:-1] + [f"{contexts[-1]} (training)"], body)


def frontier_table(rows: list[dict]) -> str:
    """Each method's best fidelity at a given alignment or more."""
    methods = [m.value for m in Method]
    body = [[m] + [_fmt(_fidelity_at(rows, m, a)) for a in ALIGNMENT_LEVELS] for m in methods]
    return _table(["method"] + [f"fidelity at alignment >= {a:g}" for a in ALIGNMENT_LEVELS], body)


def grid_table(rows: list[dict], config: dict) -> str:
    """PG two-way success (fidelity / alignment) over omega x lambda, with CFG (omega = 1) as the last row."""
    cells = {(r["omega"]["start"], r["lambda"]): r for r in rows if r["method"] == Method.TWO_WAY.value}
    cells.update({(1.0, r["lambda"]): r for r in rows if r["method"] == Method.CFG.value})
    body = []
    for omega in list(config["omegas"]) + [1.0]:
        label = f"omega = {omega:g}" + (" (CFG)" if omega == 1.0 else "")
        line = [label]
        for lam in config["lambdas"]:
            r = cells.get((omega, lam))
            line.append("-" if r is None else f"{r['success']:.2f} ({r['fidelity']:.2f} / {r['alignment']:.2f})")
        body.append(line)
    return _table(["two-way"] + [f"lambda = {lam:g}" for lam in config["lambdas"]], body)


def suggested_defaults(results: dict) -> tuple[float, float, float]:
    """The two-way (omega, lambda) with the highest success averaged over the fine-tunes, and that success."""
    totals: dict[tuple[float, float], list[float]] = {}
    for model in results["models"].values():
        for r in model["settings"]:
            if r["method"] == Method.TWO_WAY.value:
                totals.setdefault((r["omega"]["start"], r["lambda"]), []).append(r["success"])
    (omega, lam), values = max(totals.items(), key=lambda kv: sum(kv[1]) / len(kv[1]))
    return omega, lam, sum(values) / len(values)


def findings(results: dict) -> list[str]:
    """Sentences comparing personalization guidance with the baselines, computed from the numbers."""
    out = []
    for name, model in results["models"].items():
        rows = model["settings"]
        ft = next(r for r in rows if r["method"] == Method.FINETUNED.value)
        pg, base = _best(rows, PG_METHODS), _best(rows, BASELINES)
        cfg, ag = _best(rows, (Method.CFG.value,)), _best(rows, (Method.AUTOGUIDANCE.value,))
        out.append(
            f"**{name}.** Without guidance the fine-tuned model keeps the subject in its training context "
            f"(fidelity {ft['fidelity_training_context']:.2f}) but in new contexts shows the prompted background in "
            f"{ft['alignment']:.0%} of the ring pixels, with fidelity {ft['fidelity']:.2f}: "
            f"{ft['success']:.0%} of its pictures show both the subject and the prompted context."
        )
        out.append(
            f"Best CFG ({cfg['label']}): success {cfg['success']:.0%}, fidelity {cfg['fidelity']:.2f}, alignment "
            f"{cfg['alignment']:.2f}. Best autoguidance ({ag['label']}): success {ag['success']:.0%}, fidelity "
            f"{ag['fidelity']:.2f}, alignment {ag['alignment']:.2f}."
        )
        step = 100 / (results["config"]["seeds"] * (len(world.BACKGROUNDS) - 1))  # one new-context picture
        diff = 100 * (pg["success"] - base["success"])
        out.append(
            f"Best personalization guidance ({pg['label']}): success {pg['success']:.0%}, fidelity "
            f"{pg['fidelity']:.2f}, alignment {pg['alignment']:.2f}, diversity {pg['diversity']:.3f}: "
            f"{diff:+.0f} points of success against the best baseline ({base['label']}, {base['success']:.0%}); "
            f"one picture is {step:.1f} points."
        )
        wins, losses = [], []
        for level in ALIGNMENT_LEVELS:
            pg_f = max((f for m in PG_METHODS if (f := _fidelity_at(rows, m, level)) is not None), default=None)
            base_f = max((f for m in BASELINES if (f := _fidelity_at(rows, m, level)) is not None), default=None)
            if pg_f is None or base_f is None:
                continue
            (wins if pg_f > base_f else losses).append(f"{level:g} ({pg_f:.2f} vs {base_f:.2f})")
        if wins:
            out.append("On the frontier, personalization guidance reaches higher fidelity at alignment >= " + ", ".join(wins) + ".")
        if losses:
            out.append("It does not reach higher fidelity than the baselines at alignment >= " + ", ".join(losses) + ".")
    return out


def markdown(results: dict, discussion: str | None = None) -> str:
    """The whole RESULTS.md; ``discussion`` (hand-written markdown) goes after the findings."""
    config, timings = results["config"], results["timings_s"]
    omega, lam, success = suggested_defaults(results)
    parts = [HEADER.format(
        total=timings["total"] / 60, threads=results["torch"]["threads"], version=results["torch"]["version"],
        cache="loaded from study/_cache/" if results["base_loaded_from_cache"] else "trained in this run",
        pretraining=timings["pretraining"], personalization=timings["personalization"],
        sampling=timings["sampling"] + timings["text_following"], seeds=config["seeds"],
        steps=config["sample_steps"], context=config["context"], threshold=config["success_threshold"],
        params=results.get("parameters", 0), pretrain_steps=config["pretrain_steps"],
        pretrain_batch=config["pretrain_batch"], drop_prompt=config["drop_prompt"], photos=config["photos"],
        ft_steps=config["ft_steps"], ft_lr=config["ft_lr"], lora_rank=config["lora_rank"],
        lora_steps=config["lora_steps"], lora_lr=config["lora_lr"], omegas=_list(config["omegas"]),
        three_way_omega=config["three_way_omega"], three_way_lambda_p=_list(config["three_way_lambda_p"]),
        lambdas=_list(config["lambdas"]),
    )]
    tf = results["text_following"]
    parts.append("## Sanity checks\n\nPrompts without the subject (every shape x colour x background, one picture each, "
                 f"CFG lambda = {config['drift_lambda']:g}): the fraction of pictures that show what was asked.\n")
    parts.append(_table(["model", "shape", "colour", "background"],
                        [[name, _fmt(v["shape"]), _fmt(v["colour"]), _fmt(v["background"])] for name, v in tf.items()]))
    parts.append("\n## Findings\n\n" + "\n\n".join(findings(results)))
    parts.append(f"\n**Suggested defaults.** Over both fine-tunes, the two-way setting with the highest mean success is "
                 f"omega = {omega:g}, lambda = {lam:g} ({success:.0%}).\n")
    if discussion:
        parts.append(discussion.strip() + "\n")
    for name, model in results["models"].items():
        rows = model["settings"]
        parts.append(f"## {name}\n\n### Each method's best setting (new contexts)\n\n{best_table(rows)}\n")
        parts.append(f"### Success by context\n\n{context_table(rows, config)}\n")
        parts.append(f"### Frontier: best fidelity at a given alignment\n\n{frontier_table(rows)}\n")
        parts.append(f"### Two-way grid: success (fidelity / alignment)\n\n{grid_table(rows, config)}\n")
        parts.append("<details><summary>Every setting</summary>\n\n"
                     + _table(ROW_HEADER, [_row_cells(r) for r in rows]) + "\n\n</details>\n")
    return "\n".join(parts)


HEADER = """# Personalization guidance on a synthetic world: results

Written by `python -m study.run` from `results.json`; do not edit by hand. The
figures are `frontier.png` (each method's fidelity/alignment frontier) and
`samples_full.png`, `samples_lora.png` (pictures).

## How to reproduce

```
python -m study.run                          # from the repository root: this file, results.json, PNGs
python -m study.run --no-cache               # pre-train again even if study/_cache/ holds the base model
python -m study.run --quick --out /tmp/quick # the reduced run of the test suite (seconds)
python -m study.run --report-only            # rewrite RESULTS.md and frontier.png from results.json
```

This run took {total:.1f} minutes on {threads} CPU thread(s), torch {version}: pre-training
{pretraining:.0f} s (base model {cache}), personalization {personalization:.0f} s, sampling and
scoring {sampling:.0f} s. Seeds are fixed; the same machine and thread count give the same
numbers. On cores shared with other work, `--threads 1` can be faster.

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

Prompts "sks square on <context>", {seeds} pictures each, {steps} Euler steps, the same
noise for every method. The subject was photographed only on "{context}"; the other four
backgrounds are the *new contexts*, and every number below is over them unless it says
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
