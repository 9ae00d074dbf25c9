"""Every adapter type ComfyUI's LoRA loaders apply, as the personalization of a pair: the weak model is
theta_pre + omega * (theta_ft - theta_pre), with theta_ft the weights as ComfyUI itself applies the adapter
(``comfy.lora.calculate_weight``), never plain CFG in disguise, and a file made for another model refused in the
user's terms.

The adapters are those of ``adapters.py`` on the tiny SD1.5-architecture UNet, and stacks whose base already
carries a LoRA or a DoRA.
"""

from __future__ import annotations

import logging

import comfy.lora
import comfy.samplers
import comfy.sd
import comfy.supported_models
import pytest
import reference
import tiny
import torch
from adapters import ADAPTERS, oft, randn, shape_of

OMEGA = 0.3
LAMBDA = 4.0
STRENGTH = 0.8
PREFIX = "model.diffusion_model."


@pytest.fixture(scope="module")
def setup(comfy_host, tiny_files):
    base = tiny_files["unet"]["base"]
    gen = torch.Generator().manual_seed(31)
    conds = {k: (torch.randn(1, 77, 768, generator=gen), None) for k in ("c", "null")}
    return {"nodes": comfy_host.nodes, "guidance": comfy_host.guidance, "base": base, "conds": conds}


def _base_model(base: dict, on_top: dict | None = None):
    model = tiny.model_patcher(comfy.supported_models.SD15, tiny.SD15_UNET, base)
    if on_top:
        model = comfy.sd.load_lora_for_models(model, None, on_top, 1.0, 0.0)[0]
    return model


def _as_comfy_applies(model) -> dict:
    """The UNet weights of ``model`` as ComfyUI applies its patches (checkpoint keys, fp32)."""
    sd = {}
    for key, value in model.model.diffusion_model.state_dict().items():
        full = f"diffusion_model.{key}"
        weight = value.detach().to(torch.float32, copy=True)
        patches = model.patches.get(full)
        sd[PREFIX + key] = comfy.lora.calculate_weight(patches, weight, full) if patches else weight
    return sd


def _sample(setup, pair, omega):
    nodes, conds = setup["nodes"], setup["conds"]
    weak = nodes.weak_model.WeakModelInterpolator.execute(pair, "constant", omega, omega, 0.0, 1.0).args[0]
    guider = nodes.guider.PersonalizationGuider.execute(pair.finetuned, weak, [[conds["c"][0], {}]],
                                                        [[conds["null"][0], {}]], "two-way (paper)", LAMBDA, 1.0).args[0]
    latent = torch.zeros(1, 4, 8, 8)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(3))
    sigmas = comfy.samplers.calculate_sigmas(pair.finetuned.get_model_object("model_sampling"), "normal", 2)
    with torch.inference_mode():
        return guider.sample(noise, latent, comfy.samplers.sampler_object("euler"), sigmas, seed=0)


def _hand(setup, pre: dict, ft: dict):
    guider = reference.HandGuider(comfy.supported_models.SD15, tiny.SD15_UNET, ft,
                                  lambda o: reference.interpolate(pre, ft, o), lambda p: OMEGA, setup["conds"], LAMBDA)
    latent = torch.zeros(1, 4, 8, 8)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(3))
    sigmas = comfy.samplers.calculate_sigmas(guider.model_patcher.get_model_object("model_sampling"), "normal", 2)
    with torch.inference_mode():
        return guider.sample(noise, latent, comfy.samplers.sampler_object("euler"), sigmas, seed=0)


def _check_exact(setup, base_model, lora: dict, name: str, caplog):
    """The pair of ``lora`` on ``base_model`` samples as the hand reference, and omega + 0.2 does not."""
    with caplog.at_level(logging.INFO):
        pair, _ = setup["nodes"].core.lora_pairs.load_lora_pair(base_model, None, lora, STRENGTH, name)
    assert not [r for r in caplog.records if "were not loaded" in r.getMessage()], "every key of the file was applied"
    pre, ft = _as_comfy_applies(base_model), _as_comfy_applies(pair.finetuned)
    changed = [k for k in pre if not torch.equal(pre[k], ft[k])]
    assert changed, f"{name}: ComfyUI's own application changes no weight (a broken test adapter)"
    expected = _hand(setup, pre, ft)
    reference.close(_sample(setup, pair, OMEGA), expected)
    assert reference.relative_error(_sample(setup, pair, OMEGA + 0.2), expected) > 100 * reference.REL_TOL
    return pair


@pytest.mark.parametrize("kind", sorted(ADAPTERS))
def test_each_adapter_type_is_the_weight_interpolation(setup, kind, caplog):
    lora = ADAPTERS[kind](setup["base"], torch.Generator().manual_seed(sorted(ADAPTERS).index(kind)))
    _check_exact(setup, _base_model(setup["base"]), lora, f"{kind}.safetensors", caplog)
    said = [r.getMessage() for r in caplog.records if "non-linearly in the strength" in r.getMessage()]
    assert len(said) == (1 if kind in ("oft", "boft") else 0)


@pytest.mark.parametrize("under", ["lora", "dora_output_axis"])
def test_a_stack_whose_base_carries_another_adapter(setup, under, caplog):
    """The base MODEL already has a LoRA or DoRA (a style), the personalization goes on top: theta_pre is the base with
    that adapter, theta_ft adds the personalization."""
    on_top = ADAPTERS[under](setup["base"], torch.Generator().manual_seed(41))
    lora = ADAPTERS["loha"](setup["base"], torch.Generator().manual_seed(42))
    _check_exact(setup, _base_model(setup["base"], on_top), lora, "stacked.safetensors", caplog)


def test_an_adapter_comfyui_cannot_apply_is_refused_with_its_error(setup):
    """BOFT without ``.alpha``: where ComfyUI fails to apply it (it logs an error and leaves the weight as it was),
    the pair is refused with ComfyUI's message, never sampled as plain CFG; where it applies, the pair is exact."""
    base_model = _base_model(setup["base"])
    lora = oft(setup["base"], torch.Generator().manual_seed(43), butterfly=True, alpha=False)
    probe = comfy.sd.load_lora_for_models(base_model, None, lora, STRENGTH, 0.0)[0]
    key = next(iter(probe.patches))
    weight = base_model.model.state_dict()[key].to(torch.float32, copy=True)
    with setup["nodes"].core.host.patch_problems() as problems:
        comfy.lora.calculate_weight(probe.patches[key], weight.clone(), key)
    if not problems:
        pytest.skip("this ComfyUI applies BOFT without .alpha; the exact case is covered by the adapter test")
    with pytest.raises(setup["guidance"].GuidanceInputError, match=r"ComfyUI could not apply The LoRA boft\.safetensors"
                       r" to diffusion_model\..*: ERROR boft"):
        setup["nodes"].core.lora_pairs.load_lora_pair(base_model, None, lora, STRENGTH, "boft.safetensors")


def test_strength_zero_is_refused_as_no_personalization(setup):
    for kind in ("lora", "loha"):
        lora = ADAPTERS[kind](setup["base"], torch.Generator().manual_seed(44))
        with pytest.raises(setup["guidance"].GuidanceInputError, match="changes no weight of the base"):
            setup["nodes"].core.lora_pairs.load_lora_pair(_base_model(setup["base"]), None, lora, 0.0, f"{kind}.st")


def test_a_lora_for_sdxl_on_an_sd15_base_is_refused_in_the_users_terms(setup):
    """SDXL's cross-attention reads 2048-wide text features, SD1.5's 768: the refusal says the file was made for
    another model, and which, before the detail."""
    gen = torch.Generator().manual_seed(45)
    key = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_v"
    out_f = shape_of(setup["base"], "input_blocks.1.1.transformer_blocks.0.attn2.to_v")[0]
    lora = {key + ".lora_down.weight": randn(gen, 4, 2048), key + ".lora_up.weight": randn(gen, out_f, 4),
            key + ".alpha": torch.tensor(4.0)}
    with pytest.raises(setup["guidance"].GuidanceInputError) as refused:
        setup["nodes"].core.lora_pairs.load_lora_pair(_base_model(setup["base"]), None, lora, 1.0, "sdxl.safetensors")
    message = str(refused.value)
    assert message.startswith("The LoRA sdxl.safetensors was made for another model than this base (SDXL: its "
                              "cross-attention takes 2048-wide text features; this base is SD1.5, 768)")
    assert message.index("made for another model") < message.index(key)


def test_the_dense_delta_of_an_adapter_is_estimated_and_refused_with_figures(setup, monkeypatch):
    """Adapters that are not plain LoRA keep an exact dense delta: its size is estimated before any is formed, and a
    delta that cannot fit in free memory is refused with the figures."""
    import comfy.model_management

    lora = ADAPTERS["loha"](setup["base"], torch.Generator().manual_seed(46))
    monkeypatch.setattr(comfy.model_management, "get_free_memory", lambda *a, **k: 1024)
    with pytest.raises(setup["guidance"].GuidanceInputError, match=r"Forming the dense delta of The LoRA loha\.st needs "
                       r"up to \d+\.\d\d GiB of system memory for the delta plus \d+\.\d\d GiB while forming, and "
                       r"0\.00 GiB is free.* or use a plain LoRA"):
        setup["nodes"].core.lora_pairs.load_lora_pair(_base_model(setup["base"]), None, lora, STRENGTH, "loha.st")
