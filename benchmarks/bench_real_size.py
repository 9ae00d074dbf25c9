"""Real-size figures: forming a full pair in bounded memory, and the per-step cost of guidance, on CPU.

Random-weight UNets of real architecture size (SD1.5: 860M parameters, SDXL: 2.6B),
stored in fp16 as ComfyUI holds them with ``--fp16-unet`` or UNETLoader's weight dtype
(computed in fp32 on a CPU). Nothing is downloaded. Every phase runs in a fresh process
of its own, and memory is its resident set (``/proc/self/status``): the peak of a phase
is read after resetting the kernel's high-water mark (``/proc/self/clear_refs``).

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/bench_real_size.py form --arch sd15
    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/bench_real_size.py form --arch sdxl
    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/bench_real_size.py sample --arch sd15 --size 256 --steps 5

``form`` prints the time and peak memory of loading the two models with ComfyUI's
UNETLoader, then of forming the pair from them (exact, and with ``--rank`` low rank),
with the bound of docs/design.md ("Memory and cost"): the resident models plus the delta in its stored dtype plus
one tensor in fp32. ``sample`` prints, per route, the median time per steady step and its
ratio to plain CFG on the same fine-tuned model (side by side, interleaved), the first
step's extra time, and the peak memory a run adds. A benchmark, not a test: it asserts
nothing.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import bench_guidance  # this folder: run as python benchmarks/bench_real_size.py

GIB = 1024**3

ARCHS = {
    # SD1.5's UNet as ComfyUI detects it from a real checkpoint.
    "sd15": ("SD15", {
        "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
        "adm_in_channels": None, "in_channels": 4, "model_channels": 320, "num_res_blocks": [2, 2, 2, 2],
        "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1,
        "use_linear_in_transformer": False, "context_dim": 768, "num_heads": 8,
        "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
        "use_temporal_resblock": False, "use_temporal_attention": False}, 768, None),
    # SDXL's UNet as ComfyUI detects it from a real checkpoint.
    "sdxl": ("SDXL", {
        "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
        "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4, "model_channels": 320,
        "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10], "channel_mult": [1, 2, 4],
        "transformer_depth_middle": 10, "use_linear_in_transformer": True, "context_dim": 2048, "num_head_channels": 64,
        "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
        "use_temporal_resblock": False, "use_temporal_attention": False}, 2048, 1280),
}


# ---------------------------------------------------------------- memory of this process


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def rss() -> int:
    return _status("VmRSS")


class Peak:
    """The resident set's peak over a block: the kernel's high-water mark, reset at entry."""

    def __enter__(self):
        Path("/proc/self/clear_refs").write_text("5")
        self.start, self.t0 = rss(), time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
        self.peak, self.end = _status("VmHWM"), rss()


# ---------------------------------------------------------------- the host


def load_host(threads: int | None, weights: str = "fp16"):
    """ComfyUI on the CPU with this pack loaded (as ``bench_guidance`` loads it); ``weights`` as ``--weights``."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    pack = bench_guidance.load_host(cpu=True)
    from comfy.cli_args import args

    # fp16: weights held in fp16, computed in fp32 (the CPU), a mixed-dtype model; fp32: ComfyUI's CPU default,
    # weights held as they are computed. Read when a model loads.
    args.fp16_unet = weights == "fp16"
    return pack


def make_files(arch: str, folder: Path) -> dict[str, str]:
    """Base and fine-tuned diffusion-model files (fp16, random weights) and a rank-16 LoRA, made once per folder."""
    import comfy.supported_models
    import comfy.utils
    import torch

    names = {"base": f"{arch}_base.safetensors", "finetuned": f"{arch}_finetuned.safetensors",
             "lora": f"{arch}_lora.safetensors"}
    if all((folder / n).exists() for n in names.values()):
        return names
    model_class, config, _, _ = ARCHS[arch]
    model_config = getattr(comfy.supported_models, model_class)(dict(config))
    model_config.set_inference_dtype(torch.float16, torch.float32)
    model = model_config.get_model({})
    gen = torch.Generator().manual_seed(1)
    base, finetuned, lora = {}, {}, {}
    with torch.no_grad():
        for name, p in model.diffusion_model.named_parameters():
            scale = 1 / math.sqrt(math.prod(p.shape[1:])) if p.dim() > 1 else 0.02
            value = torch.randn(p.shape, generator=gen) * scale + (1.0 if p.dim() == 1 and name.endswith("weight") else 0.0)
            base[name] = value.half()
            finetuned[name] = (value + 0.05 * scale * torch.randn(p.shape, generator=gen)).half()
            if p.dim() == 2 and (".attn" in name or "proj_" in name or ".ff." in name):
                key = "lora_unet_" + name[: -len(".weight")].replace(".", "_")
                lora[key + ".lora_down.weight"] = (torch.randn(16, p.shape[1], generator=gen) / math.sqrt(p.shape[1])).half()
                lora[key + ".lora_up.weight"] = (torch.randn(p.shape[0], 16, generator=gen) * 0.25).half()
                lora[key + ".alpha"] = torch.tensor(16.0)
    for key, sd in (("base", base), ("finetuned", finetuned), ("lora", lora)):
        comfy.utils.save_torch_file(sd, str(folder / names[key]))
    return names


def _folders(folder: Path):
    import folder_paths

    folder_paths.folder_names_and_paths["diffusion_models"] = ([str(folder)], folder_paths.supported_pt_extensions)
    folder_paths.folder_names_and_paths["loras"] = ([str(folder)], folder_paths.supported_pt_extensions)


# ---------------------------------------------------------------- phases (each in a process of its own)


def phase_load(opts) -> dict:
    """Stock ComfyUI: load the base and the fine-tuned diffusion model with UNETLoader."""
    load_host(opts.threads)
    import nodes

    _folders(Path(opts.folder))
    names = make_files(opts.arch, Path(opts.folder))
    with Peak() as peak:
        models = [nodes.UNETLoader().load_unet(names[k], "default")[0] for k in ("base", "finetuned")]
    params = sum(p.numel() for p in models[0].model.diffusion_model.parameters())
    return {"params": params, "seconds": peak.seconds, "peak": peak.peak, "end": peak.end,
            "dtype": str(next(models[0].model.diffusion_model.parameters()).dtype)}


def phase_form(opts) -> dict:
    """Load both models (as above), then form the pair from them: exact, or low rank with ``--rank``."""
    pack = load_host(opts.threads)
    import nodes

    _folders(Path(opts.folder))
    names = make_files(opts.arch, Path(opts.folder))
    base, finetuned = (nodes.UNETLoader().load_unet(names[k], "default")[0] for k in ("base", "finetuned"))
    params = list(finetuned.model.diffusion_model.parameters())
    largest = max(p.numel() for p in params)
    for model in (base, finetuned):  # "resident": every page of both models in memory before the peak is taken
        for p in model.model.diffusion_model.parameters():
            p.sum()
    pairs = pack.nodes.core.full_pairs
    spec = pairs.LowRankSpec(rank=opts.rank) if opts.rank else None
    _, transient = pairs.plan_pair(base, finetuned, spec).memory  # the estimate the refusal uses
    with Peak() as peak:
        pair = pairs.pair_from_models(base, finetuned, spec)
    delta = pair.delta_bytes()
    # What sampling holds: the pack keeps no reference to the base once the delta exists, so dropping the caller's
    # leaves the fine-tuned weights and the delta (two weight sets).
    del base
    gc.collect()
    held = rss()
    # The bound for forming (docs/design.md, "Memory and cost"): the resident models, the delta kept, one tensor in fp32. The low-rank option
    # also holds its SVD's workspace for one layer (in the estimate).
    working = 4 * largest if spec is None else transient
    return {"params": sum(p.numel() for p in params), "seconds": peak.seconds, "start": peak.start, "peak": peak.peak,
            "delta": delta, "bound": peak.start + delta + working, "rank": opts.rank, "held": held,
            "model": sum(p.numel() * p.element_size() for p in params),
            "kept": None if pair.approximation is None else pair.approximation.kept_energy}


def phase_sample(opts) -> dict:
    """Per-step time of each route, interleaved, and the peak memory one run of each adds."""
    pack = load_host(opts.threads, opts.weights)
    import torch

    import nodes

    log = bench_guidance.RouteLog(pack)

    _folders(Path(opts.folder))
    names = make_files(opts.arch, Path(opts.folder))
    _, _, context, pooled = ARCHS[opts.arch]
    base = nodes.UNETLoader().load_unet(names["base"], "default")[0]
    full_ft = nodes.UNETLoader().load_unet(names["finetuned"], "default")[0]
    loader = pack.nodes.load_diffusion_pair.LoadDiffusionModelPair
    lora_pair = loader.execute(names["base"], "default", "LoRA", names["lora"], 1.0, "none", "exact", 0, 1.0).args[0]
    full_pair = pack.nodes.core.full_pairs.pair_from_models(base, full_ft)
    del base
    gen = torch.Generator().manual_seed(4)

    def cond():
        extra = {} if pooled is None else {"pooled_output": torch.randn(1, pooled, generator=gen),
                                           "width": opts.size, "height": opts.size}
        return [[torch.randn(1, 77, context, generator=gen), extra]]

    positive, null = cond(), cond()

    routes = pair_routes(pack, positive, null, opts, {("CFG, LoRA model", "PG LoRA pair"): lora_pair,
                                                      ("CFG, full fine-tune", "PG full pair"): full_pair})
    return {"params": sum(p.numel() for p in full_ft.model.diffusion_model.parameters()),
            "threads": torch.get_num_threads(), "routes": time_interleaved(routes, full_ft, opts, log)}


def pair_routes(pack, positive, null, opts, pairs: dict) -> dict:
    """Routes to time, per pair of ``pairs`` ({(CFG route's name, the pair's routes' name): pair}): CFG on its
    fine-tuned model, then two-way guidance with omega constant (``--omega``) and linear from 0 to 1."""
    import comfy.samplers

    def cfg(model):
        guider = comfy.samplers.CFGGuider(model)
        guider.set_conds(positive, null)
        guider.set_cfg(opts.lam)
        return guider

    def pg(pair, schedule):
        start, end = (opts.omega, opts.omega) if schedule == "constant" else (0.0, 1.0)
        weak = pack.nodes.weak_model.WeakModelInterpolator.execute(pair, schedule, start, end, 0.0, 1.0).args[0]
        return pack.nodes.guider.PersonalizationGuider.execute(pair.finetuned, weak, positive, null, "two-way (paper)",
                                                               opts.lam, 1.0).args[0]

    routes = {}
    for (cfg_name, name), pair in pairs.items():
        routes[cfg_name] = lambda pair=pair: cfg(pair.finetuned)
        routes[f"{name}, constant omega"] = lambda pair=pair: pg(pair, "constant")
        routes[f"{name}, linear omega"] = lambda pair=pair: pg(pair, "linear")
    return routes


def time_interleaved(routes: dict, model, opts, log) -> dict:
    """Per route: the median time of a steady step over ``opts.repeats`` rounds (after a round that loads and warms
    up, not counted), the first step's time, the most memory a run added, and where the pack ran its first weak
    evaluation (its log). The routes take turns within each round, so that a busy machine slows them alike."""
    import comfy.samplers
    import torch

    latent = torch.zeros(1, 4, opts.size // 8, opts.size // 8)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(5))
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", opts.steps)
    sampler = comfy.samplers.sampler_object("euler")
    steps, first, memory, taken = {n: [] for n in routes}, {n: [] for n in routes}, {}, {}
    for repeat in range(opts.repeats + 1):
        for name, make in routes.items():
            logged = len(log.routes)
            guider = make()
            stamps = [time.perf_counter()]
            with torch.inference_mode(), Peak() as peak:
                guider.sample(noise, latent, sampler, sigmas, seed=0, disable_pbar=True,
                              callback=lambda *a, stamps=stamps: stamps.append(time.perf_counter()))
            if len(log.routes) > logged:
                taken.setdefault(name, log.routes[logged])
            if repeat:
                steps[name].append(statistics.median(b - a for a, b in zip(stamps[1:], stamps[2:], strict=False)))
                first[name].append(stamps[1] - stamps[0])
                memory[name] = max(memory.get(name, 0), peak.peak - peak.start)
    return {n: {"step": statistics.median(steps[n]), "first": statistics.median(first[n]), "added": memory[n],
                "weak": taken.get(n, "")} for n in routes}


PHASES = {"load": phase_load, "form": phase_form, "sample": phase_sample}


def run_phase(script: str, opts, phase: str, *extra: str) -> dict:
    """Run one phase of ``script`` (this benchmark or bench_gguf.py) in a fresh process, with the options they share
    and ``extra``; its result comes back as JSON."""
    argv = [sys.executable, script, "--phase", phase, "--arch", opts.arch, "--folder", opts.folder,
            "--size", str(opts.size), "--steps", str(opts.steps), "--repeats", str(opts.repeats),
            "--lam", str(opts.lam), "--omega", str(opts.omega), *extra]
    if opts.threads:
        argv += ["--threads", str(opts.threads)]
    out = subprocess.run(argv, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _child(opts, phase: str, rank: int = 0) -> dict:
    return run_phase(__file__, opts, phase, "--rank", str(rank), "--weights", opts.weights)


def report_form(opts) -> None:
    # Loading twice: the first reads the files as the disk gives them (cold after other work), the second from the
    # page cache. Forming is compared with the faster, the stricter yardstick.
    loads = [_child(opts, "load") for _ in range(2)]
    load = min(loads, key=lambda r: r["seconds"])
    print(f"{opts.arch}: {load['params'] / 1e6:.1f}M parameters, held in {load['dtype']} (ComfyUI --fp16-unet), CPU")
    times = " s, then ".join(f"{r['seconds']:.1f}" for r in loads)
    print(f"load both models (stock UNETLoader): {times} s "
          f"(files cold, then cached); peak {load['peak'] / GIB:.2f} GiB, then {load['end'] / GIB:.2f} GiB")
    print()
    print("| forming | time | time / loading both | peak added | bytes / parameter | bound: models + delta + one fp32 tensor (low rank: + one layer's SVD) |")
    print("| --- | ---: | ---: | ---: | ---: | --- |")
    held = []
    for rank in [0] + ([opts.rank] if opts.rank else []):
        form = _child(opts, "form", rank=rank)
        added = form["peak"] - form["start"]
        what = "exact" if not rank else f"low rank {rank} (keeps {form['kept']:.3f} of the delta's energy)"
        within = "within" if form["peak"] <= form["bound"] else "OVER"
        print(f"| {what} | {form['seconds']:.1f} s | {form['seconds'] / load['seconds']:.2f}x | {added / GIB:.2f} GiB | "
              f"{added / form['params']:.2f} | {within}: peak {form['peak'] / GIB:.2f} GiB, bound {form['bound'] / GIB:.2f} GiB |")
        held.append(f"{what}: with the base dropped, {form['held'] / GIB:.2f} GiB resident (the fine-tuned "
                    f"weights {form['model'] / GIB:.2f} GiB, the delta {form['delta'] / GIB:.2f} GiB)")
    print()
    print("\n".join(held))


def report_sample(opts) -> None:
    result = _child(opts, "sample")
    held = "fp16 weights computed in fp32" if opts.weights == "fp16" else "fp32 weights"
    print(f"{opts.arch}: {result['params'] / 1e6:.1f}M parameters, {held}, CPU, "
          f"{result['threads']} torch threads, {opts.size}x{opts.size}, euler, {opts.steps} steps, lambda {opts.lam}, "
          f"omega {opts.omega}; median of {opts.repeats} runs (steady steps), interleaved")
    print_routes(result["routes"], ("CFG, LoRA model", "CFG, full fine-tune"))


def print_routes(routes: dict, baselines: tuple[str, str]) -> None:
    """The table of ``time_interleaved``'s routes, each against its CFG baseline (``baselines``: the LoRA pair's, the
    full pair's)."""
    print()
    print("| route | s / step | ratio to CFG | first step, extra over CFG's | peak added while sampling | weak evaluation "
          "(the pack's log) |")
    print("| --- | ---: | ---: | ---: | ---: | --- |")
    for name, r in routes.items():
        baseline = routes[baselines[0] if "LoRA" in name else baselines[1]]
        print(f"| {name} | {r['step']:.3f} | {r['step'] / baseline['step']:.2f}x | "
              f"{r['first'] - baseline['first']:+.2f} s | {r['added'] / GIB:.3f} GiB | {r['weak'] or '–'} |")


def parser_for(description: str, phases: dict, folder: str, size: int, steps: int, repeats: int):
    """The options both real-size benchmarks share; each adds its own (model, weights, threads) before parsing."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("command", nargs="?", choices=("form", "sample"))
    parser.add_argument("--phase", choices=phases, help=argparse.SUPPRESS)
    parser.add_argument("--folder", default=str(Path(tempfile.gettempdir()) / folder),
                        help="where the random-weight model files are made (once) and read")
    parser.add_argument("--size", type=int, default=size)
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--lam", type=float, default=5.0)
    parser.add_argument("--omega", type=float, default=0.5)
    return parser


def run(opts, phases: dict, report_form, report_sample) -> None:
    """A phase in this process (the child's side), or a report that runs its phases in fresh processes."""
    Path(opts.folder).mkdir(parents=True, exist_ok=True)
    if opts.phase:
        print(json.dumps(phases[opts.phase](opts)))
    elif opts.command == "form":
        report_form(opts)
    else:
        report_sample(opts)


def main(argv=None):
    parser = parser_for(__doc__.split("\n\n")[0], PHASES, "pg_real_size", size=256, steps=5, repeats=2)
    parser.add_argument("--arch", choices=ARCHS, default="sd15")
    parser.add_argument("--rank", type=int, default=0, help="form: also form a low-rank pair of this rank")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--weights", choices=("fp16", "fp32"), default="fp16",
                        help="sample: how ComfyUI holds the UNet's weights on the CPU (fp16: --fp16-unet, computed in "
                        "fp32; fp32: ComfyUI's CPU default)")
    run(parser.parse_args(argv), PHASES, report_form, report_sample)


if __name__ == "__main__":
    main()
