"""A run that is interrupted or fails leaves every loaded model bit-identical to before (docs/design.md, "Bad input")."""

from __future__ import annotations

import comfy.model_management
import comfy.samplers
import comfy.utils
import folder_paths
import pytest
import torch


def _cond(seed):
    return [[torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(seed)), {}]]


def _snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _assert_identical(before, after):
    assert before.keys() == after.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, f"{len(changed)} tensors changed, first: {changed[:3]}"


def _hooks(module):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


def _parameters(module):
    """The parameter objects themselves: a run that swaps weak parameters in must put these back."""
    return {name: id(p) for name, p in module.named_parameters()}


@pytest.fixture(params=["lora", "full"])
def guider_factory(request, comfy_host, tiny_files):
    nodes = comfy_host.nodes
    if request.param == "lora":
        pair = nodes.load_pair.LoadFinetunedPair.execute(tiny_files["base"], "LoRA", tiny_files["lora"], 1.0, "none").args[0]
    else:
        pair = nodes.load_pair.LoadFinetunedPair.execute(tiny_files["base"], "fine-tuned checkpoint", "none", 1.0, tiny_files["finetuned"]).args[0]
    weak = nodes.weak_model.WeakModelInterpolator.execute(pair, "linear", 0.0, 1.0, 0.0, 1.0).args[0]

    def make():
        return nodes.guider.PersonalizationGuider.execute(
            pair.finetuned, weak, _cond(1), _cond(2), "three-way", 5.0, 2.0, negative=_cond(3)).args[0]
    return pair, make


def _sample(guider, callback=None):
    latent = torch.zeros(1, 4, 8, 8)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(0))
    sigmas = comfy.samplers.calculate_sigmas(guider.model_patcher.get_model_object("model_sampling"), "normal", 4)
    with torch.inference_mode():
        return guider.sample(noise, latent, comfy.samplers.sampler_object("euler"), sigmas, callback=callback, seed=0)


def test_interrupt_mid_sampling_leaves_weights_bit_identical(guider_factory):
    pair, make = guider_factory
    module = pair.finetuned.model
    hooks_before = _hooks(module)
    clean = _sample(make())  # loads and patches the model as ComfyUI does
    loaded = _snapshot(module)
    params = _parameters(module)

    def interrupt_at_step_2(step, x0, x, total):
        if step == 1:
            comfy.model_management.interrupt_current_processing()

    with pytest.raises(comfy.model_management.InterruptProcessingException):
        _sample(make(), callback=interrupt_at_step_2)
    comfy.model_management.interrupt_current_processing(False)
    _assert_identical(loaded, _snapshot(module))
    assert _parameters(module) == params, "parameters were left swapped"
    assert _hooks(module) == hooks_before, "layer hooks were left behind"
    assert not any("forward" in m.__dict__ for m in module.modules()), "layer forwards were left replaced"
    torch.testing.assert_close(_sample(make()), clean, rtol=0, atol=0)


def test_failure_mid_sampling_leaves_weights_bit_identical(guider_factory):
    pair, make = guider_factory
    module = pair.finetuned.model
    clean = _sample(make())
    loaded = _snapshot(module)
    params = _parameters(module)

    def fail_at_step_2(step, x0, x, total):
        if step == 1:
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        _sample(make(), callback=fail_at_step_2)
    _assert_identical(loaded, _snapshot(module))
    assert _parameters(module) == params, "parameters were left swapped"
    assert not any("forward" in m.__dict__ for m in module.modules()), "layer forwards were left replaced"
    torch.testing.assert_close(_sample(make()), clean, rtol=0, atol=0)


def test_unloading_restores_the_base_checkpoint(comfy_host, tiny_files):
    """After a LoRA-pair run and an unload, the shared base weights are the checkpoint's, bit for bit."""
    nodes = comfy_host.nodes
    pair = nodes.load_pair.LoadFinetunedPair.execute(tiny_files["base"], "LoRA", tiny_files["lora"], 1.0, "none").args[0]
    weak = nodes.weak_model.WeakModelInterpolator.execute(pair, "constant", 0.3, 0.3, 0.0, 1.0).args[0]
    guider = nodes.guider.PersonalizationGuider.execute(pair.finetuned, weak, _cond(1), _cond(2), "two-way (paper)", 5.0, 1.0).args[0]
    _sample(guider)
    comfy.model_management.unload_all_models()
    checkpoint = comfy.utils.load_torch_file(folder_paths.get_full_path_or_raise("checkpoints", tiny_files["base"]))
    weights = pair.finetuned.model.state_dict()
    unet_keys = [k for k in checkpoint if k.startswith("model.diffusion_model.")]
    assert unet_keys
    for k in unet_keys:
        assert torch.equal(weights[k[len("model."):]], checkpoint[k]), k
