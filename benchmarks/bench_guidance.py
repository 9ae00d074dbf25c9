"""Per-step cost of personalization guidance against plain CFG and the stock ComfyUI routes.

Everything is timed side by side in one process, on one model architecture, sampler,
seed and step count, with the routes interleaved round-robin so that drift in the
machine's speed hits all of them alike. Figures are ratios to plain CFG on the same
fine-tuned model. Memory: the weights each route loads beside the fine-tuned model,
and the peak a sampling run adds on top of what was in use when it started (one more,
untimed run per route; see SamplingMemory). This is a benchmark, not a test: it
asserts nothing.

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/bench_guidance.py            # tiny SD1.5 UNet, 64x64, CPU
    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/bench_guidance.py --full-size  # SD1.5-size UNet, 512x512 (GPU)
    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/bench_guidance.py --families   # every family, tiny models

Models are random-weight SD1.5-architecture UNets built with ComfyUI's classes
(tests/host/tiny.py), or with ``--families`` the tiny model of every family of
tests/host/families.py; nothing is downloaded. Real-size figures: bench_real_size.py.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import logging
import os
import statistics
import sys
import time
from pathlib import Path

PACK_DIR = Path(__file__).resolve().parents[1]


def load_host(cpu: bool):
    sys.path.insert(0, os.environ["COMFYUI_PATH"])
    from comfy.cli_args import args

    args.cpu = cpu
    import utils.extra_config  # noqa: F401

    import nodes

    asyncio.run(nodes.load_custom_node(str(PACK_DIR)))
    sys.path.insert(1, str(PACK_DIR / "tests" / "host"))
    return sys.modules[str(PACK_DIR).replace(".", "_x_")]


class RouteLog(logging.Handler):
    """Where the pack ran each weak evaluation, in order, as its log names it ("the weak evaluation runs in ...")."""

    def __init__(self, pack):
        super().__init__()
        self.routes: list[str] = []
        logger = logging.getLogger(pack.__name__)
        logger.addHandler(self)
        logger.setLevel(logging.INFO)

    def emit(self, record):
        text = record.getMessage()
        if "the weak evaluation runs in" in text:
            self.routes.append(text.split("runs in ")[1].split(";")[0])


class StepTimer:
    """Wall time per sampling step, from the sampler's own step callbacks: excludes model loading and patching."""

    def __init__(self, torch, device):
        self.torch, self.cuda = torch, device.type == "cuda"
        self.stamps = []

    def callback(self, step, x0, x, total):
        if self.cuda:
            self.torch.cuda.synchronize()
        self.stamps.append(time.perf_counter())

    @property
    def per_step(self) -> float:
        return (self.stamps[-1] - self.stamps[0]) / (len(self.stamps) - 1)


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


class SamplingMemory:
    """Peak memory a sampling run adds on top of what was in use when it started (loaded models included).

    GPU: the CUDA allocator's own peak. CPU: torch allocates through the C heap, so the
    heap's bytes in use (glibc's mallinfo2: allocated chunks plus mmapped blocks) are
    read at every module's entry and exit during the run; the peak of those readings.
    """

    def __init__(self, torch, device):
        self.torch, self.cuda = torch, device.type == "cuda"
        self.start = self.peak = 0
        if not self.cuda:
            self.libc = ctypes.CDLL("libc.so.6")
            self.libc.mallinfo2.restype = _MallInfo2

    def in_use(self) -> int:
        info = self.libc.mallinfo2()
        return info.uordblks + info.hblkhd

    def sample(self, *args):
        self.peak = max(self.peak, self.in_use())

    def __enter__(self):
        if self.cuda:
            self.torch.cuda.synchronize()
            self.torch.cuda.reset_peak_memory_stats()
            self.start = self.torch.cuda.memory_allocated()
            return self
        self.start = self.peak = self.in_use()
        modules = self.torch.nn.modules.module
        self.handles = [modules.register_module_forward_pre_hook(self.sample),
                        modules.register_module_forward_hook(self.sample)]
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.torch.cuda.synchronize()
            self.peak = self.torch.cuda.max_memory_allocated()
            return
        for handle in self.handles:
            handle.remove()
        self.sample()

    @property
    def added(self) -> int:
        return self.peak - self.start


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full-size", action="store_true", help="SD1.5-size UNet at 512x512 (needs a GPU to be quick)")
    parser.add_argument("--size", type=int, default=None, help="image size in pixels (default: 64 tiny, 512 full size)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--lambda", dest="lam", type=float, default=5.0)
    parser.add_argument("--omega", type=float, default=0.5)
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--families", action="store_true",
                        help="per model family (tiny models): the route and cost of LoRA and full pairs against CFG")
    parser.add_argument("--only", default=None,
                        help="time only the routes whose name contains one of these comma-separated texts (and their baselines)")
    return parser.parse_args(argv)


def two_model_guider(ft, weak, positive, null, lam):
    """The stock way without this pack: cond on the fine-tuned UNet, uncond on a second, materialized weak UNet."""
    import comfy.model_management
    import comfy.samplers

    class TwoModelGuider(comfy.samplers.CFGGuider):
        def __init__(self, ft, weak):
            super().__init__(ft)
            self.weak = weak
            self.set_conds(positive, null)
            self.set_cfg(lam)

        def outer_sample(self, *args, **kwargs):
            comfy.model_management.load_models_gpu([self.model_patcher, self.weak])
            self.weak.pre_run()
            try:
                return super().outer_sample(*args, **kwargs)
            finally:
                self.weak.cleanup()

        def predict_noise(self, x, timestep, model_options=None, seed=None):
            model_options = {} if model_options is None else model_options
            cond = comfy.samplers.calc_cond_batch(self.inner_model, [self.conds["positive"]], x, timestep, model_options)[0]
            uncond = comfy.samplers.calc_cond_batch(self.weak.model, [self.conds["negative"]], x, timestep, model_options)[0]
            return comfy.samplers.cfg_function(self.inner_model, cond, uncond, lam, x, timestep, model_options)

    return TwoModelGuider(ft, weak)


def hook_guider(base, lora, positive, null, opts, mode):
    """The stock way with ComfyUI's hooks: the LoRA at strength 1 on the prompt, at omega on the null prompt."""
    import comfy.hooks
    import comfy.samplers

    model = base.clone()
    model.hook_mode = mode
    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(comfy.hooks.set_hooks_for_conditioning(positive, comfy.hooks.create_hook_lora(lora, 1.0, 0.0)),
                     comfy.hooks.set_hooks_for_conditioning(null, comfy.hooks.create_hook_lora(lora, opts.omega, 0.0)))
    guider.set_cfg(opts.lam)
    return guider


def sampling_inputs(model, size: int, steps: int, torch):
    """(noise, latent, sampler, sigmas) for one SD1.5-architecture run at ``size`` pixels."""
    import comfy.samplers

    latent = torch.zeros(1, 4, size // 8, size // 8)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(5))
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", steps)
    return noise, latent, comfy.samplers.sampler_object("euler"), sigmas


def sd15_routes(pack, opts, torch, device):
    """The routes timed on an SD1.5-architecture UNet (tiny, or SD1.5 size with --full-size): CFG baselines, the pack's
    LoRA and full pairs, and the stock ways without the pack. Returns (routes, baseline of each, sampling inputs,
    a function giving the weights a route loads beside the model's own, the UNet's parameter count, image size)."""
    import comfy.hooks
    import comfy.samplers
    import comfy.sd
    import comfy.supported_models
    import tiny

    torch.manual_seed(0)
    config = dict(tiny.SD15_UNET)
    size = 64
    if opts.full_size:
        config.update(num_res_blocks=[2, 2, 2, 2], channel_mult=[1, 2, 4, 4], transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
                      transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], transformer_depth_middle=1)
        size = 512
    size = opts.size or size
    sd15 = comfy.supported_models.SD15
    base_sd = tiny.unet_state_dict(config, seed=1)
    ft_sd = tiny.perturbed(base_sd, seed=2, scale=0.05)
    lora = tiny.lora_for(base_sd, seed=3, rank=opts.lora_rank)
    weak_sd = {k: base_sd[k] + opts.omega * (ft_sd[k] - base_sd[k]) for k in base_sd}

    def patcher(sd):
        mp = tiny.model_patcher(sd15, config, sd)
        mp.load_device = device
        return mp

    base = patcher(base_sd)
    lora_ft, _ = comfy.sd.load_lora_for_models(base, None, lora, 1.0, 0.0)
    full_ft = patcher(ft_sd)
    weak_full = patcher(weak_sd)
    lora_pair = pack.nodes.load_pair.PairFromModels.execute(base, lora_ft).args[0]
    full_pair = pack.nodes.load_pair.PairFromModels.execute(patcher(base_sd), full_ft).args[0]

    gen = torch.Generator().manual_seed(4)
    ctx = {k: torch.randn(1, 77, 768, generator=gen) for k in ("c", "null")}
    positive, null = [[ctx["c"], {}]], [[ctx["null"], {}]]

    def cfg(model, pos=positive, neg=null):
        guider = comfy.samplers.CFGGuider(model)
        guider.set_conds(pos, neg)
        guider.set_cfg(opts.lam)
        return guider

    # Omega per block: every block's layers scaled (no factor of 0, which would leave layers without a handler).
    per_block = {"per_block": "UNet: input / middle / output", "input_blocks": 0.5, "middle_block": 1.0,
                 "output_blocks": 0.25}

    def pg(pair, schedule, blocks="off"):
        shape, end = ("constant", opts.omega) if schedule == "constant" else ("linear", 1.0)
        start = opts.omega if schedule == "constant" else 0.0
        weak = pack.nodes.weak_model.WeakModelInterpolator.execute(pair, shape, start, end, 0.0, 1.0, blocks).args[0]
        return pack.nodes.guider.PersonalizationGuider.execute(pair.finetuned, weak, positive, null, "two-way (paper)", opts.lam, 1.0).args[0]

    def hooks(mode):
        return hook_guider(base, lora, positive, null, opts, mode)

    routes = {
        "CFG, LoRA model (baseline A)": lambda: cfg(lora_ft),
        "PG LoRA pair, constant omega": lambda: pg(lora_pair, "constant"),
        "PG LoRA pair, linear omega": lambda: pg(lora_pair, "linear"),
        "PG LoRA pair, per-block omega": lambda: pg(lora_pair, "constant", per_block),
        "stock: LoRA hooks on conds, MaxSpeed": lambda: hooks(comfy.hooks.EnumHookMode.MaxSpeed),
        "stock: LoRA hooks on conds, MinVram": lambda: hooks(comfy.hooks.EnumHookMode.MinVram),
        "CFG, full fine-tune (baseline B)": lambda: cfg(full_ft),
        "PG full pair, constant omega": lambda: pg(full_pair, "constant"),
        "PG full pair, linear omega": lambda: pg(full_pair, "linear"),
        "PG full pair, per-block omega": lambda: pg(full_pair, "constant", per_block),
        "stock: two UNets, dual-model guider": lambda: two_model_guider(full_ft, weak_full, positive, null, opts.lam),
    }
    first_b = list(routes).index("CFG, full fine-tune (baseline B)")
    baseline = {name: ("CFG, LoRA model (baseline A)" if i < first_b else "CFG, full fine-tune (baseline B)")
                for i, name in enumerate(routes)}
    if opts.only:
        keep = {name for name in routes if any(text.strip() in name for text in opts.only.split(","))}
        keep |= {baseline[name] for name in keep}
        routes = {name: make for name, make in routes.items() if name in keep}
    inputs = sampling_inputs(base, size, opts.steps, torch)

    def extra_weights(guider) -> int:
        """Bytes of weights that the route loads beside the fine-tuned model's own."""
        if hasattr(guider, "weak"):  # the dual-model guider
            return guider.weak.model_size()
        extra = guider.model_patcher.get_additional_models_with_key(pack.nodes.core.vocabulary.WRAPPER_KEY)
        return sum(p.numel() * p.element_size() for m in extra for p in m.model.parameters())

    return routes, baseline, inputs, extra_weights, sum(v.numel() for v in base_sd.values()), size


def time_routes(routes, inputs, extra_weights, repeats, torch, device):
    """Per route: seconds per step over ``repeats`` interleaved runs (after a warm-up run of each), the weights it
    loads beside the model's own, and the peak memory a second run adds (untimed)."""
    noise, latent, sampler, sigmas = inputs
    def run(name):
        guider = routes[name]()
        resident[name] = extra_weights(guider)
        timer = StepTimer(torch, device)
        with torch.inference_mode():
            guider.sample(noise, latent, sampler, sigmas, callback=timer.callback, seed=0, disable_pbar=True)
        return timer.per_step

    def sampling_memory(name) -> int:
        """Run once to load what the route needs, then measure a second run (not timed: the CPU probe is slow)."""
        guider = routes[name]()
        with torch.inference_mode():
            guider.sample(noise, latent, sampler, sigmas, seed=0, disable_pbar=True)
            with SamplingMemory(torch, device) as memory:
                guider.sample(noise, latent, sampler, sigmas, seed=0, disable_pbar=True)
        return memory.added

    resident = {}
    times = {name: [] for name in routes}
    for name in routes:  # warm-up: loads, caches, first-call costs
        run(name)
    for _ in range(repeats):
        for name in routes:
            times[name].append(run(name))
    added = {name: sampling_memory(name) for name in routes}
    return times, resident, added


def main(argv=None):
    opts = parse_args(argv)
    import torch

    if opts.threads:
        torch.set_num_threads(opts.threads)

    pack = load_host(cpu=not torch.cuda.is_available())
    if opts.families:
        return families_table(pack, opts)
    import comfy.model_management

    device = comfy.model_management.get_torch_device()
    routes, baseline, inputs, extra_weights, parameters, size = sd15_routes(pack, opts, torch, device)
    times, resident, added = time_routes(routes, inputs, extra_weights, opts.repeats, torch, device)
    print(f"device: {device}, {'SD1.5-size' if opts.full_size else 'tiny SD1.5-architecture'} UNet "
          f"({parameters / 1e6:.1f}M parameters), {size}x{size}, euler, {opts.steps} steps, "
          f"lambda {opts.lam}, omega {opts.omega}, LoRA rank {opts.lora_rank}, median of {opts.repeats}, torch threads {torch.get_num_threads()}")
    print()
    print("| route | ms / step | ratio to CFG | extra resident weights (MiB) | peak added while sampling (MiB) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name in routes:
        step = statistics.median(times[name])
        ratio = step / statistics.median(times[baseline[name]])
        extra = f"{resident[name] / 2**20:.1f}" if resident[name] else "–"
        print(f"| {name} | {step * 1e3:.1f} | {ratio:.2f}x | {extra} | {added[name] / 2**20:.1f} |")


def families_table(pack, opts) -> None:
    """For every family: the route each pair kind takes, and its time per step against CFG on the same model."""
    import comfy.model_management
    import comfy.samplers
    import comfy.sd
    import families
    import torch

    log = RouteLog(pack)
    nodes = pack.nodes
    print(f"tiny models (tests/host/families.py), CPU, torch threads {torch.get_num_threads()}, latent batch 1, "
          f"euler, {opts.steps} steps, lambda {opts.lam}, constant omega {opts.omega}, median of {opts.repeats}")
    print()
    print("| family | parameters | LoRA pair: route | ratio to CFG | full pair: route | ratio to CFG |")
    print("| --- | ---: | --- | ---: | --- | ---: |")
    for name, family in families.FAMILIES.items():
        base = family.build(seed=1)
        full = family.build(seed=1)
        families.fine_tune(full, seed=2)
        lora_model = comfy.sd.load_lora_for_models(base, None, families.lora_for(base, seed=3), 1.0, 0.0)[0]
        positive, null = family.cond(12, 10), family.cond(7, 11)
        latent = torch.zeros(family.latent_shape(1))
        noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(5))
        sigmas = comfy.samplers.calculate_sigmas(base.get_model_object("model_sampling"), "simple", opts.steps)
        row = [name, f"{sum(p.numel() for p in base.model.diffusion_model.parameters()) / 1e6:.1f}M"]
        for ft in (lora_model, full):
            pair = nodes.load_pair.PairFromModels.execute(base, ft).args[0]
            weak = nodes.weak_model.WeakModelInterpolator.execute(pair, "constant", opts.omega, opts.omega, 0.0, 1.0).args[0]

            def cfg(ft=ft, positive=positive, null=null):
                guider = comfy.samplers.CFGGuider(ft)
                guider.set_conds(positive, null)
                guider.set_cfg(opts.lam)
                return guider

            def pg(ft=ft, weak=weak, positive=positive, null=null):
                return nodes.guider.PersonalizationGuider.execute(ft, weak, positive, null, "two-way (paper)", opts.lam,
                                                                  1.0).args[0]

            times = {"cfg": [], "pg": []}
            for repeat in range(opts.repeats + 1):
                for key, make in (("cfg", cfg), ("pg", pg)):
                    timer = StepTimer(torch, torch.device("cpu"))
                    with torch.inference_mode():
                        make().sample(noise, latent, comfy.samplers.sampler_object("euler"), sigmas,
                                      callback=timer.callback, seed=0, disable_pbar=True)
                    if repeat:
                        times[key].append(timer.per_step)
            route = log.routes[-1].split(" (")[0]  # the route, without its reason
            row += [route, f"{statistics.median(times['pg']) / statistics.median(times['cfg']):.2f}x"]
            comfy.model_management.unload_all_models()
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
