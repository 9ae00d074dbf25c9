"""Omega per block (docs/design.md, "Omega per block") samples exactly, and a run that guides no step says so.

The reference materializes the weak model by hand, block by block: each tensor is
theta_pre + omega_b delta with omega_b = 1 - f (1 - omega) and f written out here from the
tensor's name (not from the pack's presets). SD1.5 with the UNet preset, Flux.2 with the
double / single stream preset, Wan 2.1 with the depth preset (three blocks, one per
third); LoRA and full pairs, guider and KSampler, constant and linear omega. A control
with one factor moved by 0.2 must miss by at least ten times the tolerance. Per-block off, and factors of 1 everywhere, are
bit-identical to the pack without per-block.
"""

from __future__ import annotations

import dataclasses
import logging
import re

import comfy.model_management
import comfy.sample
import comfy.samplers
import comfy.supported_models
import comfy.utils
import families
import folder_paths
import pytest
import reference
import tiny
import torch
from test_families import SeparateModels, build_pairs

STEPS = 3
LAMBDA, LAMBDA_P = 5.0, 2.0
LORA_STRENGTH = 0.8
UNET = "UNet: input / middle / output"
STREAMS = "double / single stream"
DEPTH = "depth: early / middle / late"
SCHEDULES = {
    "constant": dict(schedule="constant", omega=0.3, omega_end=0.3, guidance_start=0.0, guidance_end=1.0),
    "linear": dict(schedule="linear", omega=0.0, omega_end=0.9, guidance_start=0.0, guidance_end=0.7),
}
OMEGA_OF_P = {"constant": reference.omega_linear(0.3, 0.3, 0.0, 1.0), "linear": reference.omega_linear(0.0, 0.9, 0.0, 0.7)}


def per_block(preset: str, **factors) -> dict:
    """The per_block widget's value as ComfyUI passes it."""
    return {"per_block": preset, **factors}


# ------------------------------------------------------------------------------------------------------ SD1.5


@pytest.fixture(scope="module")
def sd15(comfy_host, tiny_files):
    nodes = comfy_host.nodes
    lora_sd = comfy.utils.load_torch_file(folder_paths.get_full_path_or_raise("loras", tiny_files["lora"]))
    base, finetuned = tiny_files["unet"]["base"], tiny_files["unet"]["finetuned"]
    load = nodes.load_pair.LoadFinetunedPair.execute
    lora_pair, _model, _clip, vae = load(tiny_files["base"], "LoRA", tiny_files["lora"], LORA_STRENGTH, "none").args
    pairs = {
        "lora": (lora_pair,
                 reference.lora_weights(base, lora_sd, LORA_STRENGTH),
                 lambda omega: reference.lora_weights(base, lora_sd, omega * LORA_STRENGTH)),
        "full": (load(tiny_files["base"], "fine-tuned checkpoint", "none", 1.0, tiny_files["finetuned"]).args[0],
                 finetuned, lambda omega: reference.interpolate(base, finetuned, omega)),
    }
    gen = torch.Generator().manual_seed(17)
    conds = {name: (torch.randn(1, 77, 768, generator=gen), None) for name in ("c", "null", "n")}
    return {"nodes": nodes, "pairs": pairs, "conds": conds, "guidance": comfy_host.guidance, "vae": vae}


def unet_factor(factors: tuple[float, float, float]):
    """f of a checkpoint key, written out: input blocks, the middle block, output blocks; 1 elsewhere."""
    def factor_of(key: str) -> float:
        for prefix, f in zip(("input_blocks.", "middle_block.", "output_blocks."), factors, strict=True):
            if key.startswith("model.diffusion_model." + prefix):
                return f
        return 1.0
    return factor_of


def _cond(pair):
    return [[pair[0], {}]]


def _sd15_inputs(patcher):
    latent = torch.zeros(1, 4, 8, 8)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(3))
    sigmas = comfy.samplers.calculate_sigmas(patcher.get_model_object("model_sampling"), "normal", STEPS)
    return noise, latent, sigmas


def sample_sd15(setup, pair, schedule: str, route: str, blocks=None, estimate="two-way", **weak_kwargs):
    """The pack: the Weak Model node with ``blocks`` as per_block, then the guider or the KSampler patch."""
    nodes, conds = setup["nodes"], setup["conds"]
    extra = {} if blocks is None else {"per_block": blocks}
    weak = nodes.weak_model.WeakModelInterpolator.execute(pair, **{**SCHEDULES[schedule], **extra, **weak_kwargs}).args[0]
    positive, null = _cond(conds["c"]), _cond(conds["null"])
    noise, latent, sigmas = _sd15_inputs(pair.finetuned)
    sampler = comfy.samplers.sampler_object("euler")
    three = estimate == "three-way"
    with torch.inference_mode():
        if route == "guider":
            guider = nodes.guider.PersonalizationGuider.execute(
                pair.finetuned, weak, positive, null, "three-way" if three else "two-way (paper)", LAMBDA, LAMBDA_P,
                negative=_cond(conds["n"]) if three else None).args[0]
            return guider.sample(noise, latent, sampler, sigmas, seed=0)
        patched = nodes.model_patch.PersonalizationGuidanceModel.execute(
            pair.finetuned, weak, "three-way" if three else "two-way (paper)", LAMBDA_P,
            null_conditioning=null if three else None).args[0]
        return comfy.samplers.sample(patched, noise, positive, _cond(conds["n"]) if three else null, LAMBDA,
                                     patched.load_device, sampler, sigmas, model_options=patched.model_options,
                                     latent_image=latent, seed=0)


def hand_sd15(setup, pair_name: str, schedule: str, factors, estimate="two-way"):
    _, ft_weights, weights = setup["pairs"][pair_name]
    conds = dict(setup["conds"])
    if estimate == "two-way":
        conds["n"] = None
    guider = reference.HandGuider(comfy.supported_models.SD15, tiny.SD15_UNET, ft_weights,
                                  reference.per_block(weights, unet_factor(factors)), OMEGA_OF_P[schedule], conds,
                                  LAMBDA, LAMBDA_P if estimate == "three-way" else None)
    noise, latent, sigmas = _sd15_inputs(guider.model_patcher)
    with torch.inference_mode():
        return guider.sample(noise, latent, comfy.samplers.sampler_object("euler"), sigmas, seed=0)


SD15_CASES = [
    ("lora", "constant", "guider", "two-way"),
    ("lora", "linear", "ksampler", "three-way"),
    ("full", "constant", "ksampler", "two-way"),
    ("full", "linear", "guider", "three-way"),
]
SD15_FACTORS = (0.5, 0.0, 1.0)  # scaled, kept (no handler), the run's omega


@pytest.mark.parametrize("pair_name,schedule,route,estimate", SD15_CASES, ids=["-".join(c) for c in SD15_CASES])
def test_unet_preset_matches_weights_materialized_per_block(sd15, pair_name, schedule, route, estimate, caplog):
    pair = sd15["pairs"][pair_name][0]
    blocks = per_block(UNET, **dict(zip(("input_blocks", "middle_block", "output_blocks"), SD15_FACTORS, strict=True)))
    caplog.set_level(logging.INFO)
    ours = sample_sd15(sd15, pair, schedule, route, blocks, estimate)
    assert "omega per block (input_blocks 0.5, middle_block 0, output_blocks 1)" in caplog.text
    expected = hand_sd15(sd15, pair_name, schedule, SD15_FACTORS, estimate)
    reference.close(ours, expected)
    # The control: one factor moved by 0.2 is another picture, far beyond the tolerance.
    moved = hand_sd15(sd15, pair_name, schedule, (0.7, 0.0, 1.0), estimate)
    assert reference.relative_error(ours, moved) > 100 * reference.REL_TOL


def test_lora_split_by_block_matches_stock_lora_hooks(sd15, tiny_files):
    """The stock way, without this pack: CFG on the base model whose conds carry ComfyUI's LoRA hooks, the prompt the
    whole LoRA at strength s, the null prompt each block's part of the LoRA at omega_b s (constant omega)."""
    import comfy.hooks

    nodes = sd15["nodes"]
    pair, conds = sd15["pairs"]["lora"][0], sd15["conds"]
    blocks = per_block(UNET, **dict(zip(("input_blocks", "middle_block", "output_blocks"), SD15_FACTORS, strict=True)))
    ours = sample_sd15(sd15, pair, "constant", "guider", blocks)

    lora = comfy.utils.load_torch_file(folder_paths.get_full_path_or_raise("loras", tiny_files["lora"]))
    parts = {prefix: {k: v for k, v in lora.items() if k.startswith("lora_unet_" + prefix)}
             for prefix in ("input_blocks", "middle_block", "output_blocks")}
    assert sum(map(len, parts.values())) == len(lora) and all(parts.values())
    omega = SCHEDULES["constant"]["omega"]
    weak_hooks = comfy.hooks.HookGroup.combine_all_hooks([
        comfy.hooks.create_hook_lora(part, (1.0 - f * (1.0 - omega)) * LORA_STRENGTH, 0.0)
        for part, f in zip(parts.values(), SD15_FACTORS, strict=True)])
    base = nodes.load_pair._checkpoint(tiny_files["base"])[0].clone()
    guider = comfy.samplers.CFGGuider(base)
    guider.set_conds(comfy.hooks.set_hooks_for_conditioning(_cond(conds["c"]),
                                                            comfy.hooks.create_hook_lora(lora, LORA_STRENGTH, 0.0)),
                     comfy.hooks.set_hooks_for_conditioning(_cond(conds["null"]), weak_hooks))
    guider.set_cfg(LAMBDA)
    noise, latent, sigmas = _sd15_inputs(base)
    with torch.inference_mode():
        stock = guider.sample(noise, latent, comfy.samplers.sampler_object("euler"), sigmas, seed=0)
    reference.close(ours, stock)


@pytest.mark.parametrize("pair_name", ["lora", "full"])
def test_off_and_factors_of_one_are_bit_identical_to_no_per_block(sd15, pair_name):
    pair = sd15["pairs"][pair_name][0]
    plain = sample_sd15(sd15, pair, "linear", "guider")
    assert torch.equal(sample_sd15(sd15, pair, "linear", "guider", "off"), plain)
    ones = per_block(UNET, input_blocks=1.0, middle_block=1.0, output_blocks=1.0)
    assert torch.equal(sample_sd15(sd15, pair, "linear", "guider", ones), plain)
    assert torch.equal(sample_sd15(sd15, pair, "linear", "ksampler", ones), sample_sd15(sd15, pair, "linear", "ksampler"))


def test_one_factor_everywhere_is_the_omega_it_gives_every_layer(sd15):
    """f everywhere (free form "* = f") at omega is omega' = 1 - f (1 - omega) for every layer: the same picture up
    to rounding."""
    omega = 1.0 - 0.6 * (1.0 - 0.3)
    for name in ("lora", "full"):
        pair = sd15["pairs"][name][0]
        ours = sample_sd15(sd15, pair, "constant", "guider", per_block("free form", factors="* = 0.6"))
        reference.close(ours, sample_sd15(sd15, pair, "constant", "guider", omega=omega, omega_end=omega))


def materialized(pair, low_rank_class) -> dict[str, torch.Tensor]:
    """A pair's delta per checkpoint key, written out from its tensors: scale * up @ down for low-rank factors."""
    out = {}
    for path, deltas in pair.deltas.items():
        for d in deltas:
            if isinstance(d, low_rank_class):
                weight = pair.finetuned.model.get_submodule(path).weight
                out[f"model.{path}.weight"] = d.scale * (d.up.float().flatten(1) @ d.down.float().flatten(1)).reshape(
                    weight.shape)
            else:
                out.update({f"model.{path}.{name}": t.float() for name, t in d.params.items()})
    return out


@pytest.mark.parametrize("route", ["guider", "ksampler"])
def test_a_low_rank_full_pair_takes_the_factors(sd15, tiny_files, route):
    """A full pair kept as truncated SVDs (the LoRA route): against its own factors materialized per block."""
    nodes, low_rank = sd15["nodes"], sd15["guidance"].LowRankDelta
    pair = nodes.load_pair.LoadFinetunedPair.execute(tiny_files["base"], "fine-tuned checkpoint", "none", 1.0,
                                                     tiny_files["finetuned"], full_delta="low rank", rank=8).args[0]
    assert any(isinstance(d, low_rank) for ds in pair.deltas.values() for d in ds)
    blocks = per_block(UNET, **dict(zip(("input_blocks", "middle_block", "output_blocks"), SD15_FACTORS, strict=True)))
    ours = sample_sd15(sd15, pair, "linear", route, blocks)
    ft, delta = tiny_files["unet"]["finetuned"], materialized(pair, low_rank)

    def weights(omega):
        return {k: v + (omega - 1.0) * delta[k] if k in delta else v for k, v in ft.items()}

    conds = {**sd15["conds"], "n": None}
    guider = reference.HandGuider(comfy.supported_models.SD15, tiny.SD15_UNET, ft,
                                  reference.per_block(weights, unet_factor(SD15_FACTORS)), OMEGA_OF_P["linear"], conds,
                                  LAMBDA)
    noise, latent, sigmas = _sd15_inputs(guider.model_patcher)
    with torch.inference_mode():
        expected = guider.sample(noise, latent, comfy.samplers.sampler_object("euler"), sigmas, seed=0)
    reference.close(ours, expected)


def test_workspace_is_formed_with_each_layers_factor_and_again_when_factors_change(sd15, monkeypatch):
    """Weak weights formed once (a GPU with room): each layer's slots hold theta_ft + f (omega - 1) delta, and a run
    with other factors at the same omega forms them again."""
    nodes = sd15["nodes"]
    pair = sd15["pairs"]["full"][0]
    monkeypatch.setattr(nodes.core.weak_weights, "workspace_fits", lambda model, nbytes: True)
    monkeypatch.setattr(pair, "workspace", None)  # made here, dropped after
    first = per_block(UNET, input_blocks=0.5, middle_block=0.0, output_blocks=1.0)
    ours = sample_sd15(sd15, pair, "constant", "guider", first)
    assert pair.workspace is not None
    reference.close(ours, hand_sd15(sd15, "full", "constant", SD15_FACTORS))
    other = sample_sd15(sd15, pair, "constant", "guider", per_block(UNET, input_blocks=1.0, middle_block=0.2,
                                                                    output_blocks=0.4))
    reference.close(other, hand_sd15(sd15, "full", "constant", (1.0, 0.2, 0.4)))
    assert torch.equal(sample_sd15(sd15, pair, "constant", "guider", first), ours)


def test_weight_functions_in_a_forward_of_their_own_take_the_factors(sd15, tiny_files, caplog):
    """ComfyUI's weight functions (dynamic VRAM's route, forced on the CPU as test_weight_holding.py forces it: the
    route, a partial load, and a style LoRA that the offloaded layers apply on the fly)."""
    import nodes as comfy_nodes

    nodes, guidance = sd15["nodes"], sd15["guidance"]
    pair = sd15["pairs"]["full"][0]
    styled = comfy_nodes.LoraLoaderModelOnly().load_lora_model_only(pair.finetuned, tiny_files["lora"], 0.5)[0]
    vocabulary, runtime = nodes.core.vocabulary, nodes.core.runtime
    weak = vocabulary.WeakModel(pair, guidance.OmegaSchedule.constant(0.3),
                                guidance.BlockSpec(guidance.BlockPreset.UNET, SD15_FACTORS))
    config = vocabulary.GuidanceConfig(weak=weak, route=vocabulary.Route.OWN_FORWARD)
    caplog.set_level(logging.INFO)
    with tiny.partial_load(styled.model):
        guider = comfy.samplers.CFGGuider(runtime.attach(styled, config))
        guider.set_conds(_cond(sd15["conds"]["c"]), _cond(sd15["conds"]["null"]))
        guider.set_cfg(LAMBDA)
        noise, latent, sigmas = _sd15_inputs(styled)
        with torch.inference_mode():
            ours = guider.sample(noise, latent, comfy.samplers.sampler_object("euler"), sigmas, seed=0)
    assert "WeightFunction x" in caplog.text
    lora = comfy.utils.load_torch_file(folder_paths.get_full_path_or_raise("loras", tiny_files["lora"]))
    base, ft = tiny_files["unet"]["base"], tiny_files["unet"]["finetuned"]
    weights = reference.per_block(lambda o: reference.lora_weights(reference.interpolate(base, ft, o), lora, 0.5),
                                  unet_factor(SD15_FACTORS))
    conds = {**sd15["conds"], "n": None}
    hand = reference.HandGuider(comfy.supported_models.SD15, tiny.SD15_UNET, reference.lora_weights(ft, lora, 0.5),
                                weights, lambda p: 0.3, conds, LAMBDA)
    noise, latent, sigmas = _sd15_inputs(hand.model_patcher)
    with torch.inference_mode():
        expected = hand.sample(noise, latent, comfy.samplers.sampler_object("euler"), sigmas, seed=0)
    reference.close(ours, expected)


def test_a_preset_that_fits_no_changed_layer_is_refused_at_the_weak_model(sd15):
    nodes, guidance = sd15["nodes"], sd15["guidance"]
    with pytest.raises(guidance.GuidanceInputError) as error:
        nodes.weak_model.WeakModelInterpolator.execute(sd15["pairs"]["lora"][0], **SCHEDULES["constant"],
                                                       per_block=per_block(STREAMS, double_blocks=0.5, single_blocks=1.0))
    assert STREAMS in str(error.value) and "input_blocks (0-1), middle_block" in str(error.value)
    with pytest.raises(guidance.GuidanceInputError, match=r"line 2 \('input_blocks 0.5'\)"):
        nodes.weak_model.WeakModelInterpolator.execute(sd15["pairs"]["lora"][0], **SCHEDULES["constant"],
                                                       per_block=per_block("free form", factors="* = 1\ninput_blocks 0.5"))


# ---------------------------------------------------------------------------------- sweep and schedule preview


def test_sweep_of_block_settings_equals_the_guider_with_each_setting(sd15):
    """Each line of block_settings samples every omega and lambda; rows of one batch (euler) share a setting and
    each has its own omega, scaled per layer by the factors: the images equal the guider sampled separately."""
    from comfy_extras.nodes_custom_sampler import Noise_RandomNoise, SamplerCustomAdvanced

    import nodes as comfy_nodes

    nodes, pair, conds = sd15["nodes"], sd15["pairs"]["lora"][0], sd15["conds"]
    sampler = comfy.samplers.sampler_object("euler")
    sigmas = comfy.samplers.calculate_sigmas(pair.finetuned.get_model_object("model_sampling"), "normal", 2)
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    weak = nodes.weak_model.WeakModelInterpolator.execute(pair, **SCHEDULES["constant"]).args[0]
    with torch.inference_mode():
        _grid, images, labels = nodes.tuning.sweep.Sweep.execute(
            pair.finetuned, weak, _cond(conds["c"]), _cond(conds["null"]), Noise_RandomNoise(4), sampler, sigmas, latent,
            sd15["vae"], "two-way (paper)", "0.3, 1", "5", block_settings="unet: 0.5, 0, 1\noff").args
    assert labels.splitlines() == [
        "omega 0.3, lambda 5, per-block input_blocks 0.5, middle_block 0, output_blocks 1",
        "omega 1, lambda 5, per-block input_blocks 0.5, middle_block 0, output_blocks 1",
        "omega 0.3, lambda 5, per-block off", "omega 1, lambda 5, per-block off"]
    settings = [per_block(UNET, input_blocks=0.5, middle_block=0.0, output_blocks=1.0), "off"]
    for index, (blocks, omega) in enumerate((b, o) for b in settings for o in (0.3, 1.0)):
        weak = nodes.weak_model.WeakModelInterpolator.execute(pair, "constant", omega, omega, 0.0, 1.0, blocks).args[0]
        with torch.inference_mode():
            guider = nodes.guider.PersonalizationGuider.execute(pair.finetuned, weak, _cond(conds["c"]),
                                                                _cond(conds["null"]), "two-way (paper)", 5.0).args[0]
            samples = SamplerCustomAdvanced.execute(Noise_RandomNoise(4), guider, sampler, sigmas, latent).args[0]
            expected = comfy_nodes.VAEDecode().decode(sd15["vae"], samples)[0]
        torch.testing.assert_close(images[index : index + 1], expected, rtol=0, atol=1e-4)
    assert (images[0] - images[2]).abs().max() > 0.01  # the per-block setting changes the picture


def test_schedule_preview_shows_each_blocks_omega(sd15):
    nodes, pair = sd15["nodes"], sd15["pairs"]["lora"][0]
    weak = nodes.weak_model.WeakModelInterpolator.execute(
        pair, **SCHEDULES["linear"], per_block=per_block(UNET, input_blocks=0.5, middle_block=0.0, output_blocks=1.0)
    ).args[0]
    sigmas = comfy.samplers.calculate_sigmas(pair.finetuned.get_model_object("model_sampling"), "normal", 6)
    plot, table = nodes.tuning.schedule_preview.SchedulePreview.execute(pair.finetuned, weak, sigmas, "two-way (paper)",
                                                                        5.0).args
    lines = table.splitlines()
    assert lines[0].endswith(",omega[input_blocks],omega[middle_block],omega[output_blocks]")
    for line in lines[1:]:
        values = line.split(",")
        omega, blocks = float(values[3]), [float(v) for v in values[-3:]]
        assert blocks == pytest.approx([1 - 0.5 * (1 - omega), 1.0, omega], abs=1e-6)
    assert plot.shape[0] == 1 and plot.shape[-1] == 3


# ------------------------------------------------------------------------------- the warning at denoise < 1


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "does nothing" in r.getMessage()]


@pytest.mark.parametrize("route", ["guider", "ksampler"])
def test_an_interval_that_no_step_reaches_warns_once_naming_the_steps_progress(sd15, route, caplog):
    """img2img at denoise 0.6: the steps sit late on the model's noise scale, so [0, 0.3] guides none of them."""
    nodes = sd15["nodes"]
    pair = sd15["pairs"]["lora"][0]
    conds = sd15["conds"]
    latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(8))
    sampling = pair.finetuned.get_model_object("model_sampling")

    def run(start, end):
        weak = nodes.weak_model.WeakModelInterpolator.execute(pair, "constant", 0.3, 0.3, start, end).args[0]
        caplog.clear()
        with torch.inference_mode():
            if route == "guider":
                guider = nodes.guider.PersonalizationGuider.execute(pair.finetuned, weak, _cond(conds["c"]),
                                                                    _cond(conds["null"]), "two-way (paper)", LAMBDA).args[0]
                sigmas = comfy.samplers.KSampler(pair.finetuned, steps=4, device="cpu", scheduler="normal",
                                                 denoise=0.6).sigmas
                noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(0))
                guider.sample(noise, latent, comfy.samplers.sampler_object("euler"), sigmas, seed=0)
                return sigmas
            patched = nodes.model_patch.PersonalizationGuidanceModel.execute(pair.finetuned, weak, "two-way (paper)").args[0]
            noise = comfy.sample.prepare_noise(latent, 0)
            comfy.sample.sample(patched, noise, 4, LAMBDA, "euler", "normal", _cond(conds["c"]), _cond(conds["null"]),
                                latent, denoise=0.6, seed=0)
            return comfy.samplers.KSampler(pair.finetuned, steps=4, device="cpu", scheduler="normal", denoise=0.6).sigmas

    caplog.set_level(logging.INFO)
    sigmas = run(0.0, 0.3)
    (message,) = _warnings(caplog)
    progress = [reference.progress(sampling, float(s)) for s in sigmas[:-1]]
    low, high = (float(v) for v in re.search(r"progress (\d\.\d\d)-(\d\.\d\d)", message).groups())
    assert low == pytest.approx(min(progress), abs=0.01) and high == pytest.approx(max(progress), abs=0.01)
    assert low > 0.3, "the first step of a denoise 0.6 run is past the interval"
    assert "guidance interval [0, 0.3]" in message and "plain CFG on the fine-tuned model" in message
    run(0.0, 1.0)
    assert _warnings(caplog) == []
    run(low, 1.0)
    assert _warnings(caplog) == []


def test_omega_one_and_factors_of_zero_warn(sd15, caplog):
    caplog.set_level(logging.INFO)
    pair = sd15["pairs"]["lora"][0]
    sample_sd15(sd15, pair, "constant", "guider", omega=1.0, omega_end=1.0)
    assert len(_warnings(caplog)) == 1 and "omega is 1 at every step" in _warnings(caplog)[0]
    caplog.clear()
    sample_sd15(sd15, pair, "constant", "guider", per_block("free form", factors="* = 0"))
    assert len(_warnings(caplog)) == 1 and "every block's factor is 0" in _warnings(caplog)[0]
    caplog.clear()
    sample_sd15(sd15, pair, "constant", "guider", per_block(UNET, input_blocks=0.0, middle_block=0.0, output_blocks=0.5))
    assert _warnings(caplog) == []


# ------------------------------------------------------------------------------------- diffusion transformers

# Flux.2 (one double and one single block) with the stream preset; Wan 2.1 with three blocks, one per third of depth.
DIT = {
    "flux2": (families.FAMILIES["flux2"], STREAMS, ("double_blocks", "single_blocks"), (0.4, 0.8)),
    "wan21": (dataclasses.replace(families.FAMILIES["wan21"], config={**families.FAMILIES["wan21"].config, "num_layers": 3}),
              DEPTH, ("early", "middle", "late"), (0.2, 0.6, 1.0)),
}
TOKENS = {"positive": 12, "null": 7, "negative": 9}


def dit_factor(name: str, factors):
    """f of a diffusion-model key, written out for each family's test model."""
    def factor_of(key: str) -> float:
        if name == "flux2":
            return factors[0] if key.startswith("double_blocks.") else factors[1] if key.startswith("single_blocks.") \
                else 1.0
        match = re.match(r"blocks\.(\d)\.", key)  # Wan: blocks 0, 1, 2 are the early, middle and late third
        return factors[int(match.group(1))] if match else 1.0
    return factor_of


@pytest.fixture(scope="module", params=list(DIT))
def dit(request, comfy_host):
    family, preset, names, factors = DIT[request.param]
    nodes = comfy_host.nodes
    pairs, conds = build_pairs(family, nodes)
    yield {"name": request.param, "family": family, "nodes": nodes, "pairs": pairs, "conds": conds, "preset": preset,
           "names": names, "factors": factors}
    comfy.model_management.unload_all_models()


def _dit_inputs(family, patcher):
    shape = family.latent_shape(2)
    sigmas = comfy.samplers.calculate_sigmas(patcher.get_model_object("model_sampling"), "simple", STEPS)
    return torch.randn(shape, generator=torch.Generator().manual_seed(0)), torch.zeros(shape), sigmas


def sample_dit(dit, pair, schedule, route, estimate):
    nodes, conds, family = dit["nodes"], dit["conds"], dit["family"]
    blocks = per_block(dit["preset"], **dict(zip(dit["names"], dit["factors"], strict=True)))
    weak = nodes.weak_model.WeakModelInterpolator.execute(pair, **SCHEDULES[schedule], per_block=blocks).args[0]
    est = "three-way" if estimate == "three-way" else "two-way (paper)"
    negative = conds["negative"] if estimate == "three-way" else None
    noise, latent, sigmas = _dit_inputs(family, pair.finetuned)
    sampler = comfy.samplers.sampler_object("euler")
    with torch.inference_mode():
        if route == "guider":
            guider = nodes.guider.PersonalizationGuider.execute(
                pair.finetuned, weak, conds["positive"], conds["null"], est, LAMBDA, LAMBDA_P, negative=negative).args[0]
            return guider.sample(noise, latent, sampler, sigmas, seed=0), weak.schedule
        patched = nodes.model_patch.PersonalizationGuidanceModel.execute(
            pair.finetuned, weak, est, LAMBDA_P, null_conditioning=conds["null"] if negative is not None else None).args[0]
        out = comfy.samplers.sample(patched, noise, conds["positive"], negative if negative is not None else conds["null"],
                                    LAMBDA, patched.load_device, sampler, sigmas, model_options=patched.model_options,
                                    latent_image=latent, seed=0)
        return out, weak.schedule


def hand_dit(dit, pair_kind, schedule, estimate, factors):
    family, conds = dit["family"], dit["conds"]
    _, ft_weights, weights = dit["pairs"][pair_kind]
    hand = SeparateModels(family, ft_weights, reference.per_block(weights, dit_factor(dit["name"], factors)), schedule,
                          conds, LAMBDA, LAMBDA_P if estimate == "three-way" else None)
    noise, latent, sigmas = _dit_inputs(family, hand.model_patcher)
    with torch.inference_mode():
        return hand.sample(noise, latent, comfy.samplers.sampler_object("euler"), sigmas, seed=0)


DIT_CASES = [("lora", "constant", "guider", "two-way"), ("full", "linear", "ksampler", "three-way")]


@pytest.mark.parametrize("pair_kind,schedule,route,estimate", DIT_CASES, ids=["-".join(c) for c in DIT_CASES])
def test_dit_presets_match_weights_materialized_per_block(dit, pair_kind, schedule, route, estimate):
    pair = dit["pairs"][pair_kind][0]
    ours, schedule_obj = sample_dit(dit, pair, schedule, route, estimate)
    assert torch.isfinite(ours).all()
    reference.close(ours, hand_dit(dit, pair_kind, schedule_obj, estimate, dit["factors"]))
    moved = tuple(f - 0.2 if i == 0 else f for i, f in enumerate(dit["factors"]))
    # A full fine-tune of these tiny models moves the output less than a LoRA does: 30 to 45 times the tolerance.
    assert reference.relative_error(ours, hand_dit(dit, pair_kind, schedule_obj, estimate, moved)) > 10 * reference.REL_TOL
