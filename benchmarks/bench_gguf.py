"""GGUF figures: a pair on GGUF models (loaded by the ComfyUI-GGUF custom nodes) against plain CFG on the same GGUF
model, per sampling step, and forming a full pair of two GGUF files against loading them, on CPU.

Random-weight UNets (SD1.5 size, 860M parameters, or the tests' tiny SD1.5-architecture UNet), quantized by the
tests' GGUF writer (``tests/host/gguf_files.py``) in ComfyUI-GGUF's layout. ComfyUI-GGUF is loaded from the checkout
named by ``COMFYUI_GGUF_PATH``; nothing is downloaded. Every phase runs in a fresh process of its own, and memory is
the process's resident set (as in ``bench_real_size.py``).

    COMFYUI_PATH=... COMFYUI_GGUF_PATH=... python benchmarks/bench_gguf.py form --arch sd15 --qtype Q4_K
    COMFYUI_PATH=... COMFYUI_GGUF_PATH=... python benchmarks/bench_gguf.py sample --arch tiny --size 64 --steps 6

``form`` prints the time and peak memory of loading the two GGUF files with "Unet Loader (GGUF)", then of forming
the exact pair from them, with the bound of docs/design.md ("Memory and cost") for quantized models: the models as
loaded plus one layer in the compute dtype (here the pack's own estimate: both sides of the largest layer in fp32,
each dequantized through fp16). ``sample`` prints,
per route, the median time per steady step and its ratio to CFG on the same GGUF fine-tuned model (side by side,
interleaved), the first step's extra time, and the peak memory a run adds. A benchmark, not a test: it asserts
nothing.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import bench_guidance  # this folder: run as python benchmarks/bench_gguf.py
import bench_real_size

GIB = bench_real_size.GIB


def _host(threads: int | None):
    """ComfyUI on the CPU with this pack and ComfyUI-GGUF loaded; the GGUF loader node."""
    pack = bench_real_size.load_host(threads, weights="fp32")
    import nodes

    asyncio.run(nodes.load_custom_node(os.environ["COMFYUI_GGUF_PATH"]))
    return pack, nodes.NODE_CLASS_MAPPINGS["UnetLoaderGGUF"]


def _arch(name: str):
    """(model class, UNet config, context width): SD1.5 size, or the tests' tiny SD1.5-architecture UNet."""
    if name == "tiny":
        import tiny

        return "SD15", tiny.SD15_UNET, 768
    model_class, config, context, _ = bench_real_size.ARCHS[name]
    return model_class, config, context


def make_files(opts) -> dict[str, str]:
    """The base and fine-tuned UNets as GGUF files of ``--qtype`` and a rank-16 LoRA, made once per folder."""
    import comfy.utils
    import gguf_files
    import torch

    folder = Path(opts.folder)
    names = {"base": f"{opts.arch}_base_{opts.qtype}.gguf", "finetuned": f"{opts.arch}_finetuned_{opts.qtype}.gguf",
             "lora": f"{opts.arch}_lora.safetensors"}
    if all((folder / n).exists() for n in names.values()):
        return names
    if opts.arch == "tiny":
        import tiny

        base = tiny.unet_state_dict(tiny.SD15_UNET, seed=1)
        sources = {"base": base, "finetuned": tiny.perturbed(base, seed=2, scale=0.05),
                   "lora": tiny.lora_for(base, seed=3, rank=16)}
    else:
        made = bench_real_size.make_files(opts.arch, folder)
        sources = {k: comfy.utils.load_torch_file(str(folder / made[k])) for k in ("base", "finetuned", "lora")}
    comfy.utils.save_torch_file(sources["lora"], str(folder / names["lora"]))
    for role in ("base", "finetuned"):
        sd = {k: v.to(torch.float32) for k, v in sources[role].items()}
        gguf_files.write_gguf(folder / names[role], sd, opts.qtype, "sd1")
    return names


def _load(loader, name: str):
    return loader().load_unet(name)[0]


def phase_load(opts) -> dict:
    """Stock ComfyUI-GGUF: load the base and the fine-tuned GGUF file."""
    _, loader = _host(opts.threads)
    bench_real_size._folders(Path(opts.folder))
    names = make_files(opts)
    with bench_real_size.Peak() as peak:
        models = [_load(loader, names[k]) for k in ("base", "finetuned")]
        for model in models:  # ComfyUI-GGUF reads the file lazily: every tensor in memory, as after a first run
            for p in model.model.diffusion_model.parameters():
                p.as_subclass(type(p)).data.sum()
    return {"seconds": peak.seconds, "peak": peak.peak, "end": peak.end, "start": peak.start}


def phase_form(opts) -> dict:
    """Load both files (as above), then form the exact pair from them."""
    pack, loader = _host(opts.threads)
    import torch

    bench_real_size._folders(Path(opts.folder))
    names = make_files(opts)
    base, finetuned = (_load(loader, names[k]) for k in ("base", "finetuned"))
    for model in (base, finetuned):
        for p in model.model.diffusion_model.parameters():
            p.as_subclass(torch.Tensor).sum()
    host, pairs = pack.nodes.core.host, pack.nodes.core.full_pairs
    params = list(finetuned.model.diffusion_model.parameters())
    kept, transient = pairs.plan_pair(base, finetuned).memory  # the estimate the refusal uses
    with bench_real_size.Peak() as peak:
        pair = pairs.pair_from_models(base, finetuned)
    return {"params": sum(host.true_shape(p).numel() for p in params), "seconds": peak.seconds, "start": peak.start,
            "peak": peak.peak, "delta": pair.delta_bytes(), "bound": peak.start + kept + transient,
            "reads_base": pair.reads_base is not None}


def phase_sample(opts) -> dict:
    """Per-step time of each route on the GGUF models, interleaved, and the peak memory one run of each adds."""
    pack, loader = _host(opts.threads)
    import comfy.samplers
    import comfy.utils
    import torch

    log = bench_guidance.RouteLog(pack)
    bench_real_size._folders(Path(opts.folder))
    names = make_files(opts)
    _, _, context = _arch(opts.arch)
    base, full_ft = (_load(loader, names[k]) for k in ("base", "finetuned"))
    lora = comfy.utils.load_torch_file(str(Path(opts.folder) / names["lora"]))
    lora_pair, _ = pack.nodes.core.lora_pairs.load_lora_pair(base, None, lora, 1.0, names["lora"])
    full_pair = pack.nodes.core.full_pairs.pair_from_models(base, full_ft)
    gen = torch.Generator().manual_seed(4)
    positive, null = ([[torch.randn(1, 77, context, generator=gen), {}]] for _ in range(2))

    routes = bench_real_size.pair_routes(pack, positive, null, opts, {
        ("CFG, GGUF base with the LoRA", "PG LoRA pair on the GGUF base"): lora_pair,
        ("CFG, GGUF fine-tune", "PG full pair of two GGUF files"): full_pair})
    host = pack.nodes.core.host
    return {"params": sum(host.true_shape(p).numel() for p in full_ft.model.diffusion_model.parameters()),
            "threads": torch.get_num_threads(),
            "routes": bench_real_size.time_interleaved(routes, full_ft, opts, log)}


PHASES = {"load": phase_load, "form": phase_form, "sample": phase_sample}


def _child(opts, phase: str) -> dict:
    return bench_real_size.run_phase(__file__, opts, phase, "--qtype", opts.qtype)


def report_form(opts) -> None:
    loads = [_child(opts, "load") for _ in range(2)]
    load = min(loads, key=lambda r: r["seconds"])
    form = _child(opts, "form")
    print(f"{opts.arch}: {form['params'] / 1e6:.1f}M parameters, {opts.qtype} GGUF files, CPU")
    times = " s, then ".join(f"{r['seconds']:.1f}" for r in loads)
    print(f"load both files (Unet Loader (GGUF), every tensor read): {times} s; "
          f"resident {load['end'] / GIB:.2f} GiB (peak {load['peak'] / GIB:.2f} GiB)")
    within = "within" if form["peak"] <= form["bound"] else "OVER"
    print(f"form the exact pair: {form['seconds']:.1f} s ({form['seconds'] / load['seconds']:.2f}x loading both); "
          f"peak added {(form['peak'] - form['start']) / GIB:.3f} GiB; delta kept {form['delta'] / 2**20:.1f} MiB; "
          f"reads the base while sampling: {form['reads_base']}; {within} the estimate (models as loaded + the "
          f"largest layer of both sides in fp32, each dequantized through fp16): peak {form['peak'] / GIB:.3f} GiB, "
          f"bound {form['bound'] / GIB:.3f} GiB")


def report_sample(opts) -> None:
    result = _child(opts, "sample")
    print(f"{opts.arch}: {result['params'] / 1e6:.1f}M parameters, {opts.qtype} GGUF, CPU, {result['threads']} torch "
          f"threads, {opts.size}x{opts.size}, euler, {opts.steps} steps, lambda {opts.lam}, omega {opts.omega}; "
          f"median of {opts.repeats} runs (steady steps), interleaved")
    bench_real_size.print_routes(result["routes"], ("CFG, GGUF base with the LoRA", "CFG, GGUF fine-tune"))


def main(argv=None):
    parser = bench_real_size.parser_for(__doc__.split("\n\n")[0], PHASES, "pg_gguf", size=64, steps=6, repeats=3)
    parser.add_argument("--arch", choices=("tiny", "sd15"), default="tiny")
    parser.add_argument("--qtype", default="Q8_0", help="GGUF type of both files: F16, BF16, Q8_0, Q4_0, Q4_K, ...")
    parser.add_argument("--threads", type=int, default=1)
    bench_real_size.run(parser.parse_args(argv), PHASES, report_form, report_sample)


if __name__ == "__main__":
    main()
