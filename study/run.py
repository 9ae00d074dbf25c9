"""Run the study: ``python -m study.run`` (2 CPU cores: see RESULTS.md for measured times), or ``main(quick=True)``.

Runs ``config.replicates`` independent replicates of the whole pipeline, each with its
own seed: pre-trains the base model (cached in ``study/_cache/``), personalizes it
twice (full fine-tune and LoRA), and samples every method of ``experiment.settings``
on the same noise. Writes ``results.json`` (every replicate's scores), ``RESULTS.md``
(the claims computed from them, and tables), ``frontier.png`` and ``samples_*.png`` into
the output folder (``study/`` by default).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import multiprocessing
import os
import resource
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, replace
from pathlib import Path

import torch
from torch import Tensor

from . import aggregate, experiment, plot, report, train, world
from .config import FULL, QUICK, Config
from .guiders import FullPair, LoraPair, ModelPair
from .model import Denoiser

log = logging.getLogger("study")
STUDY_DIR = Path(__file__).resolve().parent
# What the base model's weights depend on: its settings, and the thread count (sums are grouped by thread).
PRETRAIN_FIELDS = ("seed", "threads", "width", "pretrain_steps", "pretrain_batch", "pretrain_lr", "ema_decay", "drop_slot",
                   "drop_prompt")


def _cache_path(config: Config, cache_dir: Path) -> Path:
    """The cached base model's file: keyed by the pre-training settings and threads, the code that trains it, and torch."""
    key = repr([getattr(config, f) for f in PRETRAIN_FIELDS] + [torch.__version__])
    for module in ("world.py", "model.py", "train.py"):
        key += (STUDY_DIR / module).read_text()
    return cache_dir / f"base-{hashlib.sha256(key.encode()).hexdigest()[:12]}.pt"


def pretrained(config: Config, cache_dir: Path | None) -> tuple[Denoiser, bool]:
    """The base model, loaded from ``cache_dir`` when it holds one for this config; and whether it was loaded."""
    path = _cache_path(config, cache_dir) if cache_dir else None
    if path is not None and path.exists():
        model = Denoiser(world.VOCAB_SIZES, width=config.width)
        model.load_state_dict(torch.load(path, weights_only=True))
        log.info("base model loaded from %s", path)
        return model.eval().requires_grad_(False), True
    torch.manual_seed(config.seed + 1)
    model = train.pretrain(
        config.width, config.pretrain_steps, config.pretrain_batch, config.pretrain_lr, config.ema_decay,
        config.drop_slot, config.drop_prompt, torch.Generator().manual_seed(config.seed + 1),
    )
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), path)
    return model.requires_grad_(False), False


def personalize(base: Denoiser, config: Config) -> dict[str, ModelPair]:
    """The two fine-tunes of the base on the subject's photos in ``config.context``, as model pairs."""
    photos = world.subject_images(config.photos, config.context, torch.Generator().manual_seed(config.seed + 2))
    prompt = world.encode("sks", "square", "", config.context)
    torch.manual_seed(config.seed + 3)
    full = train.finetune_full(base, photos, prompt, config.ft_steps, config.ft_batch, config.ft_lr,
                               torch.Generator().manual_seed(config.seed + 3))
    torch.manual_seed(config.seed + 4)
    lora_model = train.finetune_lora(base, photos, prompt, config.lora_rank, config.lora_steps, config.ft_batch,
                                     config.lora_lr, torch.Generator().manual_seed(config.seed + 4))
    return {"full fine-tune": FullPair(base, full), "LoRA": LoraPair(lora_model)}


def _picked(config: Config, per_context: int = 3) -> Tensor:
    """Indices of the pictures shown in the sample grids: the first ``per_context`` seeds of each new context."""
    _, new = experiment.subject_prompts(config)
    starts = [i for i in range(0, len(new), config.seeds) if new[i]]
    return torch.tensor([i + k for i in starts for k in range(min(per_context, config.seeds))])


def run_replicate(config: Config, cache_dir: Path | None) -> tuple[dict, dict[str, dict[str, Tensor]]]:
    """One replicate at ``config.seed``: its record for ``results.json``, and its sample-grid pictures of every setting."""
    timings = {}
    start = time.perf_counter()
    base, loaded = pretrained(config, cache_dir)
    timings["pretraining"] = time.perf_counter() - start
    t = time.perf_counter()
    pairs = personalize(base, config)
    timings["personalization"] = time.perf_counter() - t

    t = time.perf_counter()
    record = {"seed": config.seed, "base_loaded_from_cache": loaded, "models": {}}
    any_pair = next(iter(pairs.values()))
    record["text_following"] = {"base": experiment.text_following(any_pair, config, finetuned=False)}
    for name, pair in pairs.items():
        record["text_following"][name] = experiment.text_following(pair, config, finetuned=True)
    tokens, new = experiment.subject_prompts(config)
    noise = experiment.noise_for(len(tokens), config.seed + 100)
    pick = _picked(config)
    pictures = {}
    for name, pair in pairs.items():
        scored = [experiment.run_setting(s, pair, tokens, new, noise, config) for s in experiment.settings(config)]
        record["models"][name] = {"settings": [s.row for s in scored]}
        log.info("seed %d, %s: %d settings sampled, %.0f s", config.seed, name, len(scored), time.perf_counter() - t)
        pictures[name] = {s.setting.label: s.images[pick] for s in scored}
    timings["sampling"] = time.perf_counter() - t
    record["timings_s"] = timings
    record["parameters"] = sum(p.numel() for p in base.parameters())
    return record, pictures


def main(quick: bool = False, out_dir: str | Path | None = None, config: Config | None = None,
         cache: bool = True, compare: dict | None = None) -> dict:
    """Run the study and write its outputs; returns the results (as in ``results.json``).

    ``compare``: the results of another run of the same config, for the report's
    section on how the figures vary between machines. Torch's global random state and
    thread count are restored afterwards, so that a test session that calls this is
    left as it was.
    """
    config = config or (QUICK if quick else FULL)
    out = Path(out_dir) if out_dir is not None else STUDY_DIR
    out.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.set_num_threads(config.threads)
            torch.manual_seed(config.seed)
            return _run(config, out, cache, compare)
    finally:
        torch.set_num_threads(threads)


def _worker_init(threads: int, log_level: int) -> None:
    """A replicate worker process: torch's thread count, and the parent's log level."""
    torch.set_num_threads(threads)
    logging.basicConfig(level=log_level, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")


def _replicates(config: Config, cache_dir: Path | None):
    """Yield (record, pictures) of every replicate, in order; ``config.workers`` processes run them side by side.

    A replicate's numbers depend on its seed and on ``config.threads`` only, not on
    which process ran it: each sets every seed it uses itself.
    """
    configs = [config.replicate(r) for r in range(config.replicates)]
    workers = min(config.workers, len(configs))
    if workers <= 1:
        for c in configs:
            yield run_replicate(c, cache_dir)
        return
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no torch state shared with the parent
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_worker_init,
                             initargs=(config.threads, logging.getLogger().getEffectiveLevel())) as pool:
        futures = [pool.submit(run_replicate, c, cache_dir) for c in configs]
        for future in futures:
            yield future.result()


def _cpu_seconds() -> float:
    """User and system CPU seconds of this process and of its finished children (the replicate workers)."""
    return sum(u.ru_utime + u.ru_stime for u in (resource.getrusage(resource.RUSAGE_SELF),
                                                  resource.getrusage(resource.RUSAGE_CHILDREN)))


def _run(config: Config, out: Path, cache: bool, compare: dict | None) -> dict:
    start, cpu_start, load_start = time.perf_counter(), _cpu_seconds(), os.getloadavg()
    records, first_pictures = [], None
    for record, pictures in _replicates(config, STUDY_DIR / "_cache" if cache else None):
        records.append(record)
        first_pictures = first_pictures or pictures
        log.info("replicate %d/%d (seed %d) done: %.0f s since the start", len(records), config.replicates,
                 record["seed"], time.perf_counter() - start)
    totals = {k: sum(rec["timings_s"][k] for rec in records) for k in records[0]["timings_s"]}
    totals["total"] = time.perf_counter() - start
    results = {
        "config": asdict(config),
        "torch": {"version": torch.__version__, "threads": config.threads, "workers": config.workers},
        "timings_s": totals,
        # How busy the machine was: wall times depend on it (the figures do not).
        "machine": {"cpus": os.cpu_count(), "load_start": [round(v, 2) for v in load_start],
                    "load_end": [round(v, 2) for v in os.getloadavg()], "cpu_s": round(_cpu_seconds() - cpu_start, 1)},
        "parameters": records[0]["parameters"],
        "replicates": records,
    }
    (out / "results.json").write_text(to_json(results) + "\n")
    for name, by_label in first_pictures.items():
        best = aggregate.best_per_method(aggregate.table(results, name))
        rows = {label: by_label[label] for label in best.values()}
        slug = "full" if name == "full fine-tune" else "lora"
        plot.sample_grid(rows, out / f"samples_{slug}.png",
                         f"{name}, replicate 1: 3 seeds in each new context (best setting per method over replicates)")
    write_report(results, out, compare)
    log.info("done in %.0f s: %s", totals["total"], out)
    return results


def to_json(value, depth: int = 0, flat_below: int = 6) -> str:
    """JSON of ``value``, indented down to ``flat_below`` levels (a setting's row of scores is one line)."""
    if depth >= flat_below or not isinstance(value, (dict, list)) or not value:
        return json.dumps(value)
    pad = " " * (depth + 1)
    if isinstance(value, dict):
        items = [f"{pad}{json.dumps(k)}: {to_json(v, depth + 1, flat_below)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + " " * depth + "}"
    items = [pad + to_json(v, depth + 1, flat_below) for v in value]
    return "[\n" + ",\n".join(items) + "\n" + " " * depth + "]"


def write_report(results: dict, out: Path, compare: dict | None = None) -> None:
    """RESULTS.md and frontier.png from ``results`` (and ``compare``, another run's results, if given)."""
    plot.frontier(results, out / "frontier.png")
    (out / "RESULTS.md").write_text(report.markdown(results, compare))


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the reduced run of the test suite (seconds)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: study/)")
    parser.add_argument("--no-cache", action="store_true", help="pre-train even if study/_cache/ holds the base models")
    parser.add_argument("--threads", type=int, default=None,
                        help=f"torch CPU threads of each worker (default: {FULL.threads})")
    parser.add_argument("--workers", type=int, default=None,
                        help=f"processes running replicates side by side (default: {FULL.workers})")
    parser.add_argument("--replicates", type=int, default=None, help=f"independent replicates (default: {FULL.replicates})")
    parser.add_argument("--compare", type=Path, default=None,
                        help="another run's results.json (same settings, e.g. another machine or thread count): "
                             "the report measures how far the two runs differ and whether their claims agree")
    parser.add_argument("--report-only", action="store_true",
                        help="rewrite RESULTS.md and frontier.png from the output folder's results.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    compare = None
    if args.compare:
        compare = json.loads(args.compare.read_text())
        compare["source"] = args.compare.as_posix()  # named in the report
    if args.report_only:
        out = args.out or STUDY_DIR
        write_report(json.loads((out / "results.json").read_text()), out, compare)
        return
    config = QUICK if args.quick else FULL
    for name in ("threads", "workers", "replicates"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name} must be at least 1")
        if value is not None:
            config = replace(config, **{name: value})
    main(out_dir=args.out, config=config, cache=not args.no_cache, compare=compare)


if __name__ == "__main__":
    cli()
