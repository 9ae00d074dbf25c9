"""Every way ComfyUI holds weights that a CPU can reach, and the guidance interval's ends (issue: ComfyUI 0.33).

Resident and low-VRAM partial loads are in test_sampling.py, fp8 weights in
test_diffusion_pairs.py, every family in test_families.py. Here: a weak evaluation in a
forward of its own with ComfyUI's weight functions (the route dynamic VRAM takes on a
GPU, forced on the CPU), a LoRA in bypass mode on top of the fine-tuned model (0.33),
a pair refused for a bypass LoRA, a model with MultiGPU clones refused before anything
loads, and the guidance interval decided on sigma as ComfyUI's own timestep ranges.
"""

from __future__ import annotations

import logging

import comfy.model_management
import comfy.sampler_helpers
import comfy.samplers
import comfy.sd
import comfy.supported_models
import comfy.utils
import folder_paths
import pytest
import reference
import tiny
import torch

STEPS = 3
LAMBDA = 5.0
OMEGA = 0.3


@pytest.fixture(scope="module")
def setup(comfy_host, tiny_files):
    nodes = comfy_host.nodes
    full = nodes.load_pair.LoadFinetunedPair.execute(tiny_files["base"], "fine-tuned checkpoint", "none", 1.0,
                                                     tiny_files["finetuned"]).args[0]
    gen = torch.Generator().manual_seed(21)
    conds = {k: (torch.randn(1, 77, 768, generator=gen), None) for k in ("c", "null")}
    return {"nodes": nodes, "guidance": comfy_host.guidance, "runtime": nodes.core.runtime,
            "vocabulary": nodes.core.vocabulary, "full": full, "conds": conds, "unet": tiny_files["unet"],
            "files": tiny_files}


def _comfy(cond):
    return [[cond[0], {}]]


def _inputs(patcher):
    latent = torch.zeros(2, 4, 8, 8)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(2))
    sigmas = comfy.samplers.calculate_sigmas(patcher.get_model_object("model_sampling"), "normal", STEPS)
    return noise, latent, sigmas


def _guided(setup, model, pair, route=None):
    runtime, vocabulary = setup["runtime"], setup["vocabulary"]
    weak = vocabulary.WeakModel(pair, setup["guidance"].OmegaSchedule.constant(OMEGA))
    config = vocabulary.GuidanceConfig(weak=weak, route=route)
    guider = comfy.samplers.CFGGuider(runtime.attach(model, config))
    guider.set_conds(_comfy(setup["conds"]["c"]), _comfy(setup["conds"]["null"]))
    guider.set_cfg(LAMBDA)
    noise, latent, sigmas = _inputs(model)
    with torch.inference_mode():
        return guider.sample(noise, latent, comfy.samplers.sampler_object("euler"), sigmas, seed=0)


def _hand(ft_weights, weak_weights, conds):
    guider = reference.HandGuider(comfy.supported_models.SD15, tiny.SD15_UNET, ft_weights, weak_weights,
                                  lambda p: OMEGA, conds, LAMBDA)
    noise, latent, sigmas = _inputs(guider.model_patcher)
    with torch.inference_mode():
        return guider.sample(noise, latent, comfy.samplers.sampler_object("euler"), sigmas, seed=0)


def test_weight_functions_in_a_forward_of_its_own_are_exact(setup, caplog):
    """Dynamic VRAM (0.33 on NVIDIA GPUs) streams the weights; a full pair then runs its weak evaluation in a forward
    of its own with ComfyUI's weight functions. On the CPU the weights are resident, so the route is forced, and a
    style LoRA, applied on the fly in a low-VRAM partial load, makes the layers patch their weights as they run."""
    import nodes as comfy_nodes

    pair, base, ft = setup["full"], setup["unet"]["base"], setup["unet"]["finetuned"]
    styled = comfy_nodes.LoraLoaderModelOnly().load_lora_model_only(pair.finetuned, setup["files"]["lora"], 0.5)[0]
    lora = comfy.utils.load_torch_file(folder_paths.get_full_path_or_raise("loras", setup["files"]["lora"]))
    target = styled.model
    caplog.set_level(logging.INFO)
    with tiny.partial_load(target):
        ours = _guided(setup, styled, pair, route=setup["vocabulary"].Route.OWN_FORWARD)
    assert "a forward of its own" in caplog.text and "WeightFunction x" in caplog.text
    # The fine-tuned model is theta_ft + 0.5 style; its weak model theta_pre + omega delta + 0.5 style.
    expected = _hand(reference.lora_weights(ft, lora, 0.5),
                     lambda o: reference.lora_weights(reference.interpolate(base, ft, o), lora, 0.5), setup["conds"])
    reference.close(ours, expected)
    assert not any(m.__dict__.get("weight_function") for m in target.modules() if hasattr(m, "comfy_cast_weights"))


def test_models_with_multigpu_clones_are_refused_before_loading(setup):
    """ComfyUI 0.33's MultiGPU node runs some conds on copies of the model on other GPUs, where the per-layer
    machinery does not reach: refused with a message, before anything loads. The clones are attached as the node
    attaches them (``set_additional_models("multigpu", ...)``); a CPU has no second device to make real ones."""
    pair = setup["full"]
    model = pair.finetuned.clone()
    clone = pair.finetuned.clone()
    clone.is_multigpu_base_clone = True
    model.set_additional_models("multigpu", [clone])
    comfy.model_management.unload_all_models()
    with pytest.raises(setup["guidance"].GuidanceInputError, match="several GPUs"):
        _guided(setup, model, pair)
    assert not comfy.model_management.current_loaded_models  # nothing was loaded


def test_bypass_lora(setup):
    """ComfyUI 0.33's "Load LoRA (Bypass)" adds a LoRA's output in the forward, leaving the weights as they are.
    On top of a pair's fine-tuned model: exact. As the personalization itself: refused, naming the node."""
    load_bypass = getattr(comfy.sd, "load_bypass_lora_for_models", None)
    if load_bypass is None:
        pytest.skip("needs ComfyUI 0.33 or newer: this version has no bypass LoRA mode (Load LoRA (Bypass))")
    nodes, pair, base, ft = setup["nodes"], setup["full"], setup["unet"]["base"], setup["unet"]["finetuned"]
    lora = comfy.utils.load_torch_file(folder_paths.get_full_path_or_raise("loras", setup["files"]["lora"]))
    styled = load_bypass(pair.finetuned, None, lora, 0.5, 0.0)[0]
    ours = _guided(setup, styled, pair)
    expected = _hand(reference.lora_weights(ft, lora, 0.5),
                     lambda o: reference.lora_weights(reference.interpolate(base, ft, o), lora, 0.5), setup["conds"])
    reference.close(ours, expected)

    base_model = nodes.load_pair._checkpoint(setup["files"]["base"])[0]
    bypassed = load_bypass(base_model, None, lora, 1.0, 0.0)[0]
    with pytest.raises(setup["guidance"].GuidanceInputError, match="bypass mode"):
        nodes.load_pair.PairFromModels.execute(base_model, bypassed)


def test_guidance_interval_ends_are_decided_as_comfyui_decides_timestep_ranges(setup):
    """A step whose sigma is exactly percent_to_sigma(guidance_start) or percent_to_sigma(guidance_end) is inside the
    interval, as a ConditioningSetTimestepRange cond is active there (ComfyUI's get_area_and_mult). The sigmas are
    made to hit the ends exactly; their progress in float32 is not exactly the ends (the issue's 0.4999999847)."""
    import nodes as comfy_nodes

    pair = setup["full"]
    sampling = pair.finetuned.get_model_object("model_sampling")
    start, end = 0.5, 0.8
    ends = [sampling.percent_to_sigma(start), sampling.percent_to_sigma(end)]
    sigmas = sorted({float(s) for s in comfy.samplers.calculate_sigmas(sampling, "normal", 5)} | set(ends), reverse=True)
    schedule = setup["guidance"].OmegaSchedule("linear", 0.2, 0.6, start, end)

    # ComfyUI's own convention: a cond limited to [start, end] by the stock node, asked at each sigma.
    cond = comfy_nodes.ConditioningSetTimestepRange().set_range([[torch.zeros(1, 77, 768), {}]], start, end)[0]
    converted = comfy.sampler_helpers.convert_cond(cond)
    comfy.samplers.calculate_start_end_timesteps(pair.finetuned.model, converted)  # sets each cond's sigma range
    x = torch.zeros(1, 4, 8, 8)

    def comfy_inside(sigma):
        return comfy.samplers.get_area_and_mult(converted[0], x, torch.tensor([sigma])) is not None

    from guidance import omega_at_sigma  # the pack's one function for omega over the run

    for sigma in sigmas:
        omega = omega_at_sigma(schedule, sigma, sampling.percent_to_sigma)
        assert (omega != 1.0) == comfy_inside(sigma), sigma
    assert comfy_inside(ends[0]) and comfy_inside(ends[1])
    assert omega_at_sigma(schedule, ends[0], sampling.percent_to_sigma) == pytest.approx(0.2, abs=1e-6)
    assert omega_at_sigma(schedule, ends[1], sampling.percent_to_sigma) == pytest.approx(0.6, abs=1e-6)
