"""Exactness where the weights live on a GPU: resident, and streamed by ComfyUI's dynamic VRAM (0.33 and newer).

Run by benchmarks/gpu_check.sh. Pairs of tiny SD1.5-architecture diffusion models,
loaded by ComfyUI's own loader (so that, with ``PG_DYNAMIC_VRAM=1``, they are
``ModelPatcherDynamic`` models whose layers stream their weights), sample with the
guidance and against separately materialized models on the same device. Without a GPU
the resident checks run on the CPU and the dynamic ones are skipped: this file is not
part of the CPU test suite.
"""

from __future__ import annotations

import logging

import comfy.model_management
import comfy.samplers
import comfy.sd
import comfy.supported_models
import comfy.utils
import conftest
import pytest
import reference
import tiny
import torch

STEPS = 4
LAMBDA = 5.0
OMEGA = 0.3
GPU = torch.cuda.is_available()


@pytest.fixture(scope="module")
def setup(comfy_host):
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 references: no TF32 in either side's products
    torch.backends.cudnn.allow_tf32 = False
    root = comfy_host.models_root
    base = tiny.unet_state_dict(tiny.SD15_UNET, seed=1)
    finetuned = tiny.perturbed(base, seed=2, scale=0.05)
    lora = tiny.lora_for(base, seed=4)
    for name, sd in (("base", base), ("finetuned", finetuned)):
        comfy.utils.save_torch_file({k[len("model.diffusion_model."):]: v for k, v in sd.items()},
                                    str(root / "diffusion_models" / f"{name}.safetensors"))
    comfy.utils.save_torch_file(lora, str(root / "loras" / "lora.safetensors"))
    gen = torch.Generator().manual_seed(7)
    conds = {k: (torch.randn(1, 77, 768, generator=gen), None) for k in ("c", "null")}
    return {"nodes": comfy_host.nodes, "base": base, "finetuned": finetuned, "lora": lora, "conds": conds}


def _load(setup, personalization, schedule):
    loader = setup["nodes"].load_diffusion_pair.LoadDiffusionModelPair
    lora = "lora.safetensors" if personalization == "LoRA" else "none"
    ft = "finetuned.safetensors" if personalization != "LoRA" else "none"
    pair = loader.execute("base.safetensors", "default", personalization, lora, 1.0, ft, "exact", 0, 1.0).args[0]
    shape, end = ("constant", OMEGA) if schedule == "constant" else ("linear", 0.9)
    weak = setup["nodes"].weak_model.WeakModelInterpolator.execute(pair, shape, OMEGA, end, 0.0, 1.0).args[0]
    return pair, weak


def _sample(guider, patcher):
    latent = torch.zeros(2, 4, *((16, 16) if GPU else (8, 8)))  # the CPU-reachable part kept short
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(3))
    sigmas = comfy.samplers.calculate_sigmas(patcher.get_model_object("model_sampling"), "normal", STEPS)
    with torch.inference_mode():
        return guider.sample(noise, latent, comfy.samplers.sampler_object("euler"), sigmas, seed=0).cpu()


class _HandOnDevice(reference.HandGuider):
    """The hand reference (tests/host/reference.py) with both separately built models on the compute device."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        device = comfy.model_management.get_torch_device()
        for hand in (self.ft, self.weak):
            hand.patcher.load_device = device

    def predict_noise(self, x, timestep, model_options=None, seed=None):
        model_options = {} if model_options is None else model_options
        comfy.model_management.load_models_gpu([self.ft.patcher, self.weak.patcher])
        device = x.device
        self.hand_conds = {k: None if v is None else (v[0].to(device), v[1]) for k, v in self.hand_conds.items()}
        return super().predict_noise(x, timestep, model_options, seed)


@pytest.mark.parametrize("personalization", ["LoRA", "fine-tuned checkpoint"])
@pytest.mark.parametrize("schedule", ["constant", "linear"])
def test_pairs_sample_exactly_on_the_device(setup, personalization, schedule, caplog):
    if not GPU and conftest.DYNAMIC:
        pytest.skip("dynamic VRAM needs a GPU")
    caplog.set_level(logging.INFO)
    pair, weak = _load(setup, personalization, schedule)
    if conftest.DYNAMIC:
        assert pair.finetuned.is_dynamic(), "ComfyUI's loader did not make a dynamic-VRAM model"
    conds = setup["conds"]
    guider = setup["nodes"].guider.PersonalizationGuider.execute(
        pair.finetuned, weak, [[conds["c"][0], {}]], [[conds["null"][0], {}]], "two-way (paper)", LAMBDA, 1.0).args[0]
    ours = _sample(guider, pair.finetuned)
    base, ft = setup["base"], setup["finetuned"]
    if personalization == "LoRA":
        ft_w, weak_w = reference.lora_weights(base, setup["lora"], 1.0), lambda o: reference.lora_weights(base, setup["lora"], o)
    else:
        ft_w, weak_w = ft, lambda o: reference.interpolate(base, ft, o)
    omega_of_p = (lambda p: OMEGA) if schedule == "constant" else reference.omega_linear(OMEGA, 0.9, 0.0, 1.0)
    hand = _HandOnDevice(comfy.supported_models.SD15, tiny.SD15_UNET, ft_w, weak_w, omega_of_p, conds, LAMBDA)
    reference.close(ours, _sample(hand, hand.model_patcher))
    if conftest.DYNAMIC and personalization != "LoRA":
        # Streamed weights: a full pair's weak evaluation runs in a forward of its own with ComfyUI's weight
        # functions; no workspace is allocated.
        assert "a forward of its own" in caplog.text and "WeightFunction x" in caplog.text
        assert pair.workspace is None
    comfy.model_management.unload_all_models()
