"""Run the study: ``python -m study.run`` (about 10 minutes on 2 CPU cores), or ``main(quick=True)`` (seconds).

Pre-trains the base model (cached in ``study/_cache/``), personalizes it twice
(full fine-tune and LoRA), samples every method of ``experiment.settings`` on the
same noise, and writes ``results.json``, ``RESULTS.md``, ``frontier.png`` and
``samples.png`` into the output folder (``study/`` by default).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from . import experiment, plot, report, train, world
from .config import FULL, QUICK, Config
from .guiders import FullPair, LoraPair, Method, ModelPair
from .model import Denoiser

log = logging.getLogger("study")
STUDY_DIR = Path(__file__).resolve().parent
PRETRAIN_FIELDS = ("seed", "width", "pretrain_steps", "pretrain_batch", "pretrain_lr", "ema_decay", "drop_slot", "drop_prompt")


def _cache_path(config: Config, cache_dir: Path) -> Path:
    """The cached base model's file: keyed by the pre-training settings, the code that trains it, and torch."""
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


def _best(scored: list[experiment.Scored], method: Method) -> experiment.Scored | None:
    """The setting of ``method`` with the most successes (ties: higher fidelity + alignment)."""
    own = [s for s in scored if s.setting.method == method]
    return max(own, key=lambda s: (s.row["success"], s.row["fidelity"] + s.row["alignment"]), default=None)


def _sample_rows(scored: list[experiment.Scored], config: Config, per_context: int = 3) -> dict:
    """For the sample grid: each method's best setting, ``per_context`` pictures per new context."""
    tokens, new = experiment.subject_prompts(config)
    starts = [i for i in range(0, len(tokens), config.seeds) if new[i]]
    pick = torch.tensor([i + k for i in starts for k in range(min(per_context, config.seeds))])
    rows = {}
    for method in Method:
        best = _best(scored, method)
        if best is not None:
            rows[best.setting.label] = best.images[pick]
    return rows


def main(quick: bool = False, out_dir: str | Path | None = None, config: Config | None = None,
         cache: bool = True) -> dict:
    """Run the study and write its outputs; returns the results (as in ``results.json``).

    Torch's global random state and thread count are restored afterwards, so that a
    test session that calls this is left as it was.
    """
    config = config or (QUICK if quick else FULL)
    out = Path(out_dir) if out_dir is not None else STUDY_DIR
    out.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.set_num_threads(config.threads)
            torch.manual_seed(config.seed)
            return _run(config, out, cache)
    finally:
        torch.set_num_threads(threads)


def _run(config: Config, out: Path, cache: bool) -> dict:
    timings = {}
    start = time.perf_counter()

    base, loaded = pretrained(config, STUDY_DIR / "_cache" if cache else None)
    timings["pretraining"] = time.perf_counter() - start
    t = time.perf_counter()
    pairs = personalize(base, config)
    timings["personalization"] = time.perf_counter() - t

    t = time.perf_counter()
    results = {"config": asdict(config), "base_loaded_from_cache": loaded, "models": {}}
    any_pair = next(iter(pairs.values()))
    results["text_following"] = {"base": experiment.text_following(any_pair, config, finetuned=False)}
    for name, pair in pairs.items():
        results["text_following"][name] = experiment.text_following(pair, config, finetuned=True)
    timings["text_following"] = time.perf_counter() - t

    t = time.perf_counter()
    tokens, new = experiment.subject_prompts(config)
    noise = experiment.noise_for(len(tokens), config.seed + 100)
    grids = {}
    for name, pair in pairs.items():
        scored = []
        for setting in experiment.settings(config):
            scored.append(experiment.run_setting(setting, pair, tokens, new, noise, config))
        log.info("%s: %d settings sampled, %.0f s", name, len(scored), time.perf_counter() - t)
        results["models"][name] = {"settings": [s.row for s in scored]}
        grids[name] = _sample_rows(scored, config)
    timings["sampling"] = time.perf_counter() - t

    timings["total"] = time.perf_counter() - start
    results["timings_s"] = timings
    results["torch"] = {"version": torch.__version__, "threads": torch.get_num_threads()}
    results["parameters"] = sum(p.numel() for p in base.parameters())
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    for name, rows in grids.items():
        slug = "full" if name == "full fine-tune" else "lora"
        plot.sample_grid(rows, out / f"samples_{slug}.png", f"{name}: 3 seeds in each new context (best setting per method)")
    write_report(results, out)
    log.info("done in %.0f s: %s", timings["total"], out)
    return results


def write_report(results: dict, out: Path) -> None:
    """RESULTS.md and frontier.png from ``results``; the hand-written discussion only for the full config."""
    plot.frontier(results, out / "frontier.png")
    discussion = STUDY_DIR / "discussion.md"
    full = results["config"] == json.loads(json.dumps(asdict(FULL)))
    text = discussion.read_text() if full and discussion.exists() else None
    (out / "RESULTS.md").write_text(report.markdown(results, text))


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the reduced run of the test suite (seconds)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: study/)")
    parser.add_argument("--no-cache", action="store_true", help="pre-train even if study/_cache/ holds the base model")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: 2)")
    parser.add_argument("--report-only", action="store_true",
                        help="rewrite RESULTS.md and frontier.png from the output folder's results.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if args.report_only:
        out = args.out or STUDY_DIR
        write_report(json.loads((out / "results.json").read_text()), out)
        return
    config = QUICK if args.quick else FULL
    if args.threads is not None:
        config = replace(config, threads=args.threads)
    main(out_dir=args.out, config=config, cache=not args.no_cache)


if __name__ == "__main__":
    cli()
