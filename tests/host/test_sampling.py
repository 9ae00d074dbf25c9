"""Sampled latents equal a reference computed another way, for every route the pack offers.

The reference (reference.py) materializes the fine-tuned and the weak model as
separate modules with hand-interpolated weights, and writes the estimate out by
hand. The pack instead keeps one model and corrects the weak rows of the batch.
"""

from __future__ import annotations

import logging

import comfy.samplers
import comfy.supported_models
import pytest
import reference
import tiny
import torch

STEPS = 3
LAMBDA = 5.0
LAMBDA_P = 2.0
LORA_STRENGTH = 0.8


@pytest.fixture(scope="module")
def setup(comfy_host, tiny_files):
    import comfy.utils
    import folder_paths

    nodes = comfy_host.nodes
    lora_sd = comfy.utils.load_torch_file(folder_paths.get_full_path_or_raise("loras", tiny_files["lora"]))
    base, finetuned = tiny_files["unet"]["base"], tiny_files["unet"]["finetuned"]
    lora_pair = nodes.load_pair.LoadFinetunedPair.execute(tiny_files["base"], "LoRA", tiny_files["lora"], LORA_STRENGTH, "none").args[0]
    full_pair = nodes.load_pair.LoadFinetunedPair.execute(tiny_files["base"], "fine-tuned checkpoint", "none", 1.0, tiny_files["finetuned"]).args[0]
    gen = torch.Generator().manual_seed(7)
    conds = {name: (torch.randn(1, 77, 768, generator=gen), None) for name in ("c", "null", "n")}
    return {
        "nodes": nodes,
        "pairs": {
            "lora": (lora_pair, reference.lora_weights(base, lora_sd, LORA_STRENGTH),
                     lambda omega: reference.lora_weights(base, lora_sd, omega * LORA_STRENGTH)),
            "full": (full_pair, finetuned, lambda omega: reference.interpolate(base, finetuned, omega)),
        },
        "conds": conds,
    }


SCHEDULES = {
    "constant": (dict(schedule="constant", omega=0.3, omega_end=0.3, guidance_start=0.0, guidance_end=1.0),
                 reference.omega_linear(0.3, 0.3, 0.0, 1.0)),
    "linear": (dict(schedule="linear", omega=0.0, omega_end=0.9, guidance_start=0.0, guidance_end=0.7),
               reference.omega_linear(0.0, 0.9, 0.0, 0.7)),
}


def comfy_cond(pair):
    ctx, y = pair
    extra = {} if y is None else {"pooled_output": y}
    return [[ctx, extra]]


def sample_inputs(model_patcher, seed=0):
    gen = torch.Generator().manual_seed(seed)
    latent = torch.zeros(1, 4, 8, 8)
    noise = torch.randn(latent.shape, generator=gen)
    sigmas = comfy.samplers.calculate_sigmas(model_patcher.get_model_object("model_sampling"), "normal", STEPS)
    return noise, latent, sigmas


class RowCounter:
    """Counts the batch rows that reach a diffusion model's forward: evaluations per step times batch."""

    def __init__(self, module):
        self.rows = 0
        self.handle = module.register_forward_pre_hook(self.count)

    def count(self, module, args):
        self.rows += args[0].shape[0]

    def close(self):
        self.handle.remove()


def run_pack(setup, pair_name, schedule, estimate, route, negative):
    nodes = setup["nodes"]
    pair = setup["pairs"][pair_name][0]
    conds = setup["conds"]
    weak = nodes.weak_model.WeakModelInterpolator.execute(pair, **SCHEDULES[schedule][0]).args[0]
    three_way = estimate == "three-way"
    est = "three-way" if three_way else "two-way (paper)"
    positive, null = comfy_cond(conds["c"]), comfy_cond(conds["null"])
    neg = comfy_cond(conds["n"]) if negative else None
    noise, latent, sigmas = sample_inputs(pair.finetuned)
    sampler = comfy.samplers.sampler_object("euler")
    counter = RowCounter(pair.finetuned.model.diffusion_model)
    try:
        with torch.inference_mode():
            if route == "guider":
                guider = nodes.guider.PersonalizationGuider.execute(
                    pair.finetuned, weak, positive, null, est, LAMBDA, LAMBDA_P, negative=neg).args[0]
                out = guider.sample(noise, latent, sampler, sigmas, seed=0)
            else:
                patched = nodes.model_patch.PersonalizationGuidanceModel.execute(
                    pair.finetuned, weak, est, LAMBDA_P, null_conditioning=null if three_way else None).args[0]
                sampler_negative = neg if (three_way and negative) else null
                if three_way and not negative:
                    sampler_negative = null
                out = comfy.samplers.sample(patched, noise, positive, sampler_negative, LAMBDA, patched.load_device,
                                            sampler, sigmas, model_options=patched.model_options, latent_image=latent, seed=0)
    finally:
        counter.close()
    return out, counter.rows / STEPS


_REFERENCES = {}


def run_reference(setup, pair_name, schedule, estimate, negative):
    """The hand reference; cached, since the two routes share it."""
    key = (pair_name, schedule, estimate, negative)
    if key not in _REFERENCES:
        _, ft_weights, weak_weights = setup["pairs"][pair_name]
        conds = dict(setup["conds"])
        if not negative:
            conds["n"] = None
        guider = reference.HandGuider(
            comfy.supported_models.SD15, tiny.SD15_UNET, ft_weights, weak_weights, SCHEDULES[schedule][1], conds,
            LAMBDA, LAMBDA_P if estimate == "three-way" else None)
        noise, latent, sigmas = sample_inputs(guider.model_patcher)
        with torch.inference_mode():
            out = guider.sample(noise, latent, comfy.samplers.sampler_object("euler"), sigmas, seed=0)
        _REFERENCES[key] = (out, guider.omegas)
    return _REFERENCES[key]


# Every pair kind, schedule, estimate and route, each against the others (not the full product: it is slow on CPU).
CASES = [
    ("lora", "constant", "two-way", "guider", False),
    ("lora", "constant", "two-way", "ksampler", False),
    ("lora", "linear", "three-way", "guider", True),
    ("lora", "linear", "three-way", "ksampler", False),
    ("full", "constant", "three-way", "ksampler", True),
    ("full", "constant", "two-way", "guider", False),
    ("full", "linear", "two-way", "ksampler", False),
    ("full", "linear", "three-way", "guider", True),
]


@pytest.mark.parametrize("pair,schedule,estimate,route,negative", CASES,
                         ids=["-".join(str(v) for v in c[:4]) + ("-neg" if c[4] else "") for c in CASES])
def test_sampled_latent_matches_hand_reference(setup, pair, schedule, estimate, route, negative):
    ours, rows_per_step = run_pack(setup, pair, schedule, estimate, route, negative)
    expected, omegas = run_reference(setup, pair, schedule, estimate, negative)
    assert torch.isfinite(ours).all()
    reference.close(ours, expected)
    if schedule == "linear":
        assert len(set(omegas)) > 2, "the schedule should move omega during the run"
    # Evaluations per step (docs/design.md, "Memory and cost"); the latent batch is 1.
    if estimate == "two-way":
        assert rows_per_step == 2
    elif negative or schedule == "constant":
        assert rows_per_step == 3
    else:
        # Three-way with n = null: after the guidance interval omega is 1, D_w(null) is D_ft(null), one row less.
        steps_outside = sum(1 for omega in omegas if omega == 1.0)
        assert rows_per_step * STEPS == 3 * STEPS - steps_outside


class ForwardLog:
    """For each diffusion-model forward: its batch rows, and whether a changed layer runs the pack's split forward."""

    def __init__(self, module, layer):
        self.calls = []
        self.handle = module.register_forward_pre_hook(
            lambda m, args: self.calls.append([args[0].shape[0], "forward" in layer.__dict__]))

    def close(self):
        self.handle.remove()


@pytest.mark.parametrize("pair_name,estimate,expected", [
    # Full fine-tunes: the changed layers run their weak rows with weak weights (their forward is split by rows).
    ("full", "two-way", [[2, True]]),
    ("full", "three-way", [[3, True]]),
    # LoRA pairs: the layers run as they are, and a hook corrects the weak rows.
    ("lora", "two-way", [[2, False]]),
    ("lora", "three-way", [[3, False]]),
])
def test_route_per_pair_kind(setup, pair_name, estimate, expected, monkeypatch):
    """One batched forward per step on both routes, as CFG's; the layers are restored after the run."""
    nodes = setup["nodes"]
    pair = setup["pairs"][pair_name][0]
    layer = pair.finetuned.model.get_submodule(next(iter(pair.deltas)))
    weak = nodes.weak_model.WeakModelInterpolator.execute(pair, **SCHEDULES["linear"][0]).args[0]
    est = "three-way" if estimate == "three-way" else "two-way (paper)"
    conds = setup["conds"]
    neg = comfy_cond(conds["n"]) if estimate == "three-way" else None
    guider = nodes.guider.PersonalizationGuider.execute(
        pair.finetuned, weak, comfy_cond(conds["c"]), comfy_cond(conds["null"]), est, LAMBDA, LAMBDA_P, negative=neg).args[0]
    noise, latent, sigmas = sample_inputs(pair.finetuned)
    import comfy.model_management

    comfy.model_management.load_models_gpu([pair.finetuned])  # LoRA patches in place: parameters as while sampling
    params = {name: id(p) for name, p in pair.finetuned.model.named_parameters()}
    log = ForwardLog(pair.finetuned.model.diffusion_model, layer)
    try:
        with torch.inference_mode():
            guider.sample(noise, latent, comfy.samplers.sampler_object("euler"), sigmas, seed=0)
    finally:
        log.close()
    # The linear schedule starts at omega 0; its first step already has weak rows.
    assert log.calls == expected * STEPS
    assert not any("forward" in m.__dict__ for m in pair.finetuned.model.modules())
    assert {name: id(p) for name, p in pair.finetuned.model.named_parameters()} == params
    extra = guider.model_patcher.get_additional_models_with_key(nodes.core.vocabulary.WRAPPER_KEY)
    # Two weight sets at most (docs/design.md, "Memory and cost"): with omega moving, theta_ft and the delta (weak weights formed just in time).
    assert extra == [pair.delta_patcher]
    if pair_name == "full":
        flat = nodes.weak_model.WeakModelInterpolator.execute(pair, **SCHEDULES["constant"][0]).args[0]

        def guiders():
            return [nodes.guider.PersonalizationGuider.execute(
                pair.finetuned, flat, comfy_cond(conds["c"]), comfy_cond(conds["null"]), est, LAMBDA, LAMBDA_P,
                negative=neg).args[0] for _ in range(2)]

        # On the CPU the device is the system memory that holds the delta: a workspace would be a third weight set.
        for g in guiders():
            assert g.model_patcher.get_additional_models_with_key(nodes.core.vocabulary.WRAPPER_KEY) == [pair.delta_patcher]
        assert pair.workspace is None
        # Where the device has room (a GPU): theta_ft and the weak weights, one workspace per pair shared by its guiders.
        monkeypatch.setattr(nodes.core.weak_weights, "workspace_fits", lambda model, nbytes: True)
        monkeypatch.setattr(pair, "workspace", None)  # made here, dropped after
        for g in guiders():
            assert pair.workspace is not None
            assert g.model_patcher.get_additional_models_with_key(nodes.core.vocabulary.WRAPPER_KEY) == [pair.workspace]
    else:
        assert pair.workspace is None


@pytest.mark.parametrize("pair_name,schedule", [("lora", "linear"), ("full", "constant"), ("full", "linear")])
def test_low_vram_partial_load_matches_hand_reference(setup, pair_name, schedule, caplog):
    """ComfyUI loads a model partially when VRAM is short: some layers then cast their weights on every forward and
    apply LoRA patches on the fly. The CPU never loads partially, so the load is told a third of the model fits;
    the rest is ComfyUI's own low-VRAM code. Cast layers take weak weights formed in their compute dtype; layers
    patched on the fly take the correction."""
    pair = setup["pairs"][pair_name][0]
    target = pair.finetuned.model
    caplog.set_level(logging.INFO)
    with tiny.partial_load(target):
        ours, _ = run_pack(setup, pair_name, schedule, "two-way", "guider", False)
        cast = [name for name, m in target.named_modules() if getattr(m, "comfy_cast_weights", False)]
        patched_on_the_fly = [name for name, m in target.named_modules() if getattr(m, "weight_function", None)]
    assert target.model_lowvram is False  # unloaded again
    assert cast, "the load was not partial"
    if pair_name == "lora":
        assert patched_on_the_fly, "no LoRA patch was applied on the fly"
    else:
        # Layers cast on every forward still compute with their own parameters: weak weights in the compute dtype.
        assert "handlers: WeakWeights x" in caplog.text and "Correction" not in caplog.text
    expected, _ = run_reference(setup, pair_name, schedule, "two-way", False)
    reference.close(ours, expected)


def test_weak_weights_are_formed_once_per_value_of_omega(setup, monkeypatch):
    """Constant omega: formed by the first run, reused by the next (same loaded weights). A moving schedule: once
    per forward with weak rows, which has a new omega each time (omega 1 needs none)."""
    nodes = setup["nodes"]
    pair = setup["pairs"]["full"][0]
    weak_weights = nodes.core.weak_weights
    formed = []
    weak_parameter = weak_weights.weak_parameter

    def counting(finetuned, delta, coefficient, out=None):
        formed.append(coefficient)
        return weak_parameter(finetuned, delta, coefficient, out=out)

    monkeypatch.setattr(weak_weights, "weak_parameter", counting)  # forming the workspace
    monkeypatch.setattr(nodes.core.handlers, "weak_parameter", counting)  # forming just in time
    monkeypatch.setattr(weak_weights, "workspace_fits", lambda model, nbytes: True)  # as on a GPU with room
    monkeypatch.setattr(pair, "workspace", None)  # made here, dropped after
    conds = setup["conds"]

    def sample(schedule):
        weak = nodes.weak_model.WeakModelInterpolator.execute(pair, **SCHEDULES[schedule][0]).args[0]
        guider = nodes.guider.PersonalizationGuider.execute(
            pair.finetuned, weak, comfy_cond(conds["c"]), comfy_cond(conds["null"]), "two-way (paper)", LAMBDA, 1.0).args[0]
        noise, latent, sigmas = sample_inputs(pair.finetuned)
        with torch.inference_mode():
            return guider.sample(noise, latent, comfy.samplers.sampler_object("euler"), sigmas, seed=0)

    first = sample("constant")
    assert pair.workspace is not None
    slots = sum(len(s) for s in pair.workspace.model.layers.values())
    assert formed == [0.3 - 1.0] * slots
    second = sample("constant")
    assert len(formed) == slots  # nothing formed again
    assert torch.equal(first, second)

    # A moving omega: each layer forms its weak parameters just in time, in every forward with weak rows.
    formed.clear()
    sample("linear")
    _, omegas = run_reference(setup, "full", "linear", "two-way", False)
    expected = [o - 1.0 for o in omegas if o != 1.0]
    # (the reference computes progress exactly, the pack inverts sigma by bisection: equal to 1e-3)
    assert formed[::slots] == pytest.approx(expected, abs=1e-3) and len(formed) == slots * len(expected)


def test_weak_weights_follow_the_loaded_weights(setup, tiny_files, monkeypatch):
    """The workspace is reused only while the same weights are loaded: a MODEL with one more LoRA on the fine-tuned
    model (allowed: its weak model is that model plus (omega - 1) delta) forms its own, and going back forms again."""
    import nodes as comfy_nodes

    nodes = setup["nodes"]
    pair = setup["pairs"]["full"][0]
    weak_weights = nodes.core.weak_weights
    formed = []
    weak_parameter = weak_weights.weak_parameter
    monkeypatch.setattr(weak_weights, "weak_parameter",
                        lambda finetuned, delta, c, out=None: formed.append(c) or weak_parameter(finetuned, delta, c, out=out))
    monkeypatch.setattr(weak_weights, "workspace_fits", lambda model, nbytes: True)  # as on a GPU with room
    monkeypatch.setattr(pair, "workspace", None)  # made here, dropped after
    styled = comfy_nodes.LoraLoaderModelOnly().load_lora_model_only(pair.finetuned, tiny_files["lora"], 0.5)[0]
    weak = nodes.weak_model.WeakModelInterpolator.execute(pair, **SCHEDULES["constant"][0]).args[0]
    conds = setup["conds"]

    def sample(model):
        guider = nodes.guider.PersonalizationGuider.execute(
            model, weak, comfy_cond(conds["c"]), comfy_cond(conds["null"]), "two-way (paper)", LAMBDA, 1.0).args[0]
        noise, latent, sigmas = sample_inputs(model)
        with torch.inference_mode():
            return guider.sample(noise, latent, comfy.samplers.sampler_object("euler"), sigmas, seed=0)

    first = sample(pair.finetuned)
    formed.clear()
    with_style = sample(styled)
    assert formed, "the styled model's weights were not formed"
    assert reference.relative_error(with_style, first) > 100 * reference.REL_TOL
    formed.clear()
    again = sample(pair.finetuned)
    assert formed, "the workspace still held the styled model's weak weights"
    assert torch.equal(again, first)
