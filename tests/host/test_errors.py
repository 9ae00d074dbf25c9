"""Bad input: a clear error before sampling (docs/design.md, "Bad input")."""

from __future__ import annotations

import logging

import comfy.supported_models
import comfy.utils
import folder_paths
import pytest
import tiny
import torch


@pytest.fixture(scope="module")
def nodes(comfy_host):
    return comfy_host.nodes


@pytest.fixture(scope="module")
def error(comfy_host):
    return comfy_host.guidance.GuidanceInputError


@pytest.fixture(scope="module")
def lora_pair(nodes, tiny_files):
    return nodes.load_pair.LoadFinetunedPair.execute(tiny_files["base"], "LoRA", tiny_files["lora"], 1.0, "none").args


def test_different_architectures_name_the_tensors(nodes, tiny_files, error):
    with pytest.raises(error, match="different architectures.*only in the base: diffusion_model.middle_block"):
        nodes.load_pair.LoadFinetunedPair.execute(tiny_files["base"], "fine-tuned checkpoint", "none", 1.0, tiny_files["other"])


def test_lora_matching_nothing_is_an_error(nodes, tiny_files, error):
    with pytest.raises(error, match="matches no layer"):
        nodes.load_pair.LoadFinetunedPair.execute(tiny_files["base"], "LoRA", tiny_files["alien_lora"], 1.0, "none")


def test_partly_matching_lora_warns_with_counts(nodes, tiny_files, caplog):
    with caplog.at_level(logging.WARNING):
        pair = nodes.load_pair.LoadFinetunedPair.execute(tiny_files["base"], "LoRA", tiny_files["partial_lora"], 1.0, "none").args[0]
    lora = comfy.utils.load_torch_file(folder_paths.get_full_path_or_raise("loras", tiny_files["partial_lora"]))
    warnings = [r.getMessage() for r in caplog.records if "were not loaded" in r.getMessage()]
    assert len(warnings) == 1
    assert f"matched {len(lora) - 2} of {len(lora)} tensors" in warnings[0]
    assert "lora_unet_no_such_layer" in warnings[0]
    assert pair.deltas


def test_nan_in_lora_is_an_error(comfy_host, tiny_files, error):
    lora = tiny.lora_for(tiny_files["unet"]["base"], seed=11)
    key = sorted(k for k in lora if k.endswith("lora_up.weight"))[3]
    lora[key][0, 0] = float("nan")
    base = tiny.model_patcher(comfy.supported_models.SD15, tiny.SD15_UNET, tiny_files["unet"]["base"])
    with pytest.raises(error, match=f"NaN or Inf in 1 tensor.*{key}"):
        comfy_host.nodes.core.lora_pairs.load_lora_pair(base, None, lora, 1.0, "bad.safetensors")


def test_inf_in_finetuned_weights_is_an_error(comfy_host, tiny_files, error):
    ft_sd = dict(tiny_files["unet"]["finetuned"])
    key = "model.diffusion_model.out.2.weight"
    ft_sd[key] = ft_sd[key].clone()
    ft_sd[key][0, 0, 0, 0] = float("inf")
    base = tiny.model_patcher(comfy.supported_models.SD15, tiny.SD15_UNET, tiny_files["unet"]["base"])
    ft = tiny.model_patcher(comfy.supported_models.SD15, tiny.SD15_UNET, ft_sd)
    with pytest.raises(error, match="fine-tuned model holds NaN or Inf.*out.2.weight"):
        comfy_host.nodes.load_pair.PairFromModels.execute(base, ft)


def test_mixed_dtypes_form_the_delta_in_fp32(comfy_host, tiny_files):
    base_sd = {k: v.half() for k, v in tiny_files["unet"]["base"].items()}
    ft_sd = tiny_files["unet"]["finetuned"]
    base = tiny.model_patcher(comfy.supported_models.SD15, tiny.SD15_UNET, base_sd)
    base.model.diffusion_model.half()
    ft = tiny.model_patcher(comfy.supported_models.SD15, tiny.SD15_UNET, ft_sd)
    pair = comfy_host.nodes.load_pair.PairFromModels.execute(base, ft).args[0]
    layer = "diffusion_model.out.2"
    delta = next(d for d in pair.deltas[layer] if d.weight is not None)
    assert delta.weight.dtype == torch.float32
    expected = ft_sd["model." + layer + ".weight"].float() - base_sd["model." + layer + ".weight"].float()
    torch.testing.assert_close(delta.weight, expected, rtol=0, atol=0)


@pytest.mark.parametrize("field,value", [("omega", 1.5), ("omega", -0.1), ("omega_end", 2.0), ("guidance_start", float("nan"))])
def test_omega_out_of_range(nodes, lora_pair, error, field, value):
    kwargs = dict(schedule="linear", omega=0.5, omega_end=0.5, guidance_start=0.0, guidance_end=1.0)
    kwargs[field] = value
    with pytest.raises(error, match=f"{field} must be between 0 and 1"):
        nodes.weak_model.WeakModelInterpolator.execute(lora_pair[0], **kwargs)


def test_empty_guidance_interval_is_a_validation_error(nodes):
    message = nodes.weak_model.WeakModelInterpolator.validate_inputs(guidance_start=0.8, guidance_end=0.2)
    assert isinstance(message, str) and "must not be after" in message
    assert nodes.weak_model.WeakModelInterpolator.validate_inputs(guidance_start=0.2, guidance_end=0.8) is True
    # validate_inputs takes over ComfyUI's range checks for the inputs it names.
    assert "guidance_start must be between 0 and 1" in nodes.weak_model.WeakModelInterpolator.validate_inputs(
        guidance_start=-0.5, guidance_end=0.8)
    assert "guidance_end must be between 0 and 1" in nodes.weak_model.WeakModelInterpolator.validate_inputs(
        guidance_start=0.2, guidance_end=1.5)


def _weak(nodes, pair):
    return nodes.weak_model.WeakModelInterpolator.execute(pair, "constant", 0.5, 0.5, 0.0, 1.0).args[0]


def _cond(seed):
    return [[torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(seed)), {}]]


@pytest.mark.parametrize("scale_name", ["guidance_scale", "personalization_scale"])
@pytest.mark.parametrize("value", [-1.0, 101.0, float("inf")])
def test_scales_out_of_range(nodes, lora_pair, error, scale_name, value):
    scales = {"guidance_scale": 5.0, "personalization_scale": 2.0, scale_name: value}
    with pytest.raises(error, match=f"{scale_name} must be between 0 and 100"):
        nodes.guider.PersonalizationGuider.execute(
            lora_pair[1], _weak(nodes, lora_pair[0]), _cond(1), _cond(2), "three-way", negative=_cond(3), **scales)


def test_model_from_another_pair_is_rejected(nodes, lora_pair, tiny_files, error):
    stranger = tiny.model_patcher(comfy.supported_models.SD15, tiny.SD15_UNET, tiny_files["unet"]["base"])
    with pytest.raises(error, match="not the fine-tuned MODEL of this pair"):
        nodes.model_patch.PersonalizationGuidanceModel.execute(stranger, _weak(nodes, lora_pair[0]), "two-way (paper)", 1.0)


def test_base_model_instead_of_finetuned_is_rejected(nodes, comfy_host, tiny_files, error):
    import comfy.sd

    lora = comfy.utils.load_torch_file(folder_paths.get_full_path_or_raise("loras", tiny_files["lora"]))
    base = tiny.model_patcher(comfy.supported_models.SD15, tiny.SD15_UNET, tiny_files["unet"]["base"])
    ft, _ = comfy.sd.load_lora_for_models(base, None, lora, 1.0, 0.0)
    pair = nodes.load_pair.PairFromModels.execute(base, ft).args[0]
    with pytest.raises(error, match="lost the fine-tuned patches"):
        nodes.model_patch.PersonalizationGuidanceModel.execute(base, _weak(nodes, pair), "two-way (paper)", 1.0)


def test_pair_without_personalization_is_rejected(nodes, tiny_files, error):
    base = tiny.model_patcher(comfy.supported_models.SD15, tiny.SD15_UNET, tiny_files["unet"]["base"])
    with pytest.raises(error, match="no patches beyond the base"):
        nodes.load_pair.PairFromModels.execute(base, base.clone())


def test_two_way_with_a_negative_is_rejected(nodes, lora_pair, error):
    with pytest.raises(error, match="two-way estimate has no negative"):
        nodes.guider.PersonalizationGuider.execute(
            lora_pair[1], _weak(nodes, lora_pair[0]), _cond(1), _cond(2), "two-way (paper)", 5.0, 2.0, negative=_cond(3))


def test_three_way_patch_needs_null_conditioning(nodes, lora_pair, error):
    with pytest.raises(error, match="needs null_conditioning"):
        nodes.model_patch.PersonalizationGuidanceModel.execute(lora_pair[1], _weak(nodes, lora_pair[0]), "three-way", 2.0)


def test_guidance_applied_twice_is_rejected(nodes, lora_pair, error):
    weak = _weak(nodes, lora_pair[0])
    once = nodes.model_patch.PersonalizationGuidanceModel.execute(lora_pair[1], weak, "two-way (paper)", 1.0).args[0]
    with pytest.raises(error, match="already has personalization guidance"):
        nodes.model_patch.PersonalizationGuidanceModel.execute(once, weak, "two-way (paper)", 1.0)


def test_base_given_as_its_own_finetune_is_refused_before_loading(nodes, tiny_files, error, monkeypatch):
    import comfy.sd

    def no_loading(*args, **kwargs):
        raise AssertionError("a checkpoint was loaded")

    monkeypatch.setattr(comfy.sd, "load_checkpoint_guess_config", no_loading)
    with pytest.raises(error, match=r"The fine-tuned file is the base itself \(" + tiny_files["base"]):
        nodes.load_pair.LoadFinetunedPair.execute(tiny_files["base"], "fine-tuned checkpoint", "none", 1.0,
                                                  tiny_files["base"])


def test_each_mode_shows_only_its_own_inputs(nodes):
    """A LoRA pair shows no fine-tuned checkpoint and a full pair no LoRA (but its exact/low-rank choice); constant omega shows no omega_end; two-way
    shows neither the personalization scale nor a negative socket; the KSampler patch needs the null prompt in
    three-way only."""
    def modes(node, name):
        (combo,) = [i for i in node.define_schema().inputs if i.id == name]
        return {option.key: [(i.id, i.optional) for i in option.inputs] for option in combo.options}

    assert modes(nodes.load_pair.LoadFinetunedPair, "personalization") == {
        "LoRA": [("lora_name", False), ("lora_strength", False)],
        "fine-tuned checkpoint": [("finetuned_checkpoint", False), ("full_delta", False)]}
    assert modes(nodes.load_diffusion_pair.LoadDiffusionModelPair, "personalization") == {
        "LoRA": [("lora_name", False), ("lora_strength", False)],
        "fine-tuned checkpoint": [("finetuned_model", False), ("full_delta", False)]}
    assert modes(nodes.weak_model.WeakModelInterpolator, "schedule") == {
        "constant": [("omega", False)], "linear": [("omega", False), ("omega_end", False)],
        "cosine": [("omega", False), ("omega_end", False)]}
    assert modes(nodes.guider.PersonalizationGuider, "estimate") == {
        "two-way (paper)": [("guidance_scale", False)],
        "three-way": [("negative", True), ("guidance_scale", False), ("personalization_scale", False)]}
    assert modes(nodes.model_patch.PersonalizationGuidanceModel, "estimate") == {
        "two-way (paper)": [], "three-way": [("null_conditioning", False), ("personalization_scale", False)]}


def test_a_missing_lora_file_is_reported_once_at_its_widget(comfy_host, tiny_files):
    """ComfyUI checks the file lists of the shown mode itself: one error, at lora_name."""
    import workflow_api

    loader = {"class_type": "PG_LoadFinetunedPair", "inputs": {
        "base_checkpoint": tiny_files["base"], "personalization": "LoRA", "personalization.lora_name": "typo.safetensors",
        "personalization.lora_strength": 1.0}}
    valid, _error, _outputs, node_errors = workflow_api.validate({"1": loader, **_saving("1")})
    assert not valid
    (error,) = node_errors["1"]["errors"]
    assert error["extra_info"]["input_name"] == "personalization.lora_name"
    assert "typo.safetensors" in error["details"]


def _saving(loader: str) -> dict:
    """Nodes that make the loader part of a prompt with an output: its VAE decodes an empty latent and is saved."""
    return {"2": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
            "3": {"class_type": "VAEDecode", "inputs": {"samples": ["2", 0], "vae": [loader, 3]}},
            "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "never"}}}
