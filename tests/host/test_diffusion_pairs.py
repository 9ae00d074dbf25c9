"""Pairs from diffusion-model files (ComfyUI's diffusion_models folder), fp8 weights, and the low-rank option.

The diffusion-model loader loads with ComfyUI's own UNETLoader; pairs it forms sample
exactly against separately materialized models, with the weights stored in fp8 as well
(computed in fp32 on the CPU). The low-rank option's error against the exact pair falls
as the rank grows and vanishes at full rank.
"""

from __future__ import annotations

import gc
import logging
import weakref

import comfy.samplers
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
def files(tiny_files):
    """Base and fine-tuned SD1.5-architecture diffusion models (bare UNet keys) and the LoRA, in ComfyUI's folders."""
    return {"base": tiny_files["base_unet"], "finetuned": tiny_files["finetuned_unet"], "lora": tiny_files["lora"],
            "unet": tiny_files["unet"]}


def _conds(seed=4):
    gen = torch.Generator().manual_seed(seed)
    return {k: (torch.randn(1, 77, 768, generator=gen), None) for k in ("c", "null")}


def _sample(nodes, pair, conds, omega=OMEGA):
    weak = nodes.weak_model.WeakModelInterpolator.execute(pair, "constant", omega, omega, 0.0, 1.0).args[0]
    guider = nodes.guider.PersonalizationGuider.execute(
        pair.finetuned, weak, [[conds["c"][0], {}]], [[conds["null"][0], {}]], "two-way (paper)", LAMBDA, 1.0).args[0]
    latent = torch.zeros(2, 4, 8, 8)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(1))
    sigmas = comfy.samplers.calculate_sigmas(pair.finetuned.get_model_object("model_sampling"), "normal", STEPS)
    with torch.inference_mode():
        return guider.sample(noise, latent, comfy.samplers.sampler_object("euler"), sigmas, seed=0)


def _hand(ft, weak, conds):
    guider = reference.HandGuider(comfy.supported_models.SD15, tiny.SD15_UNET, ft, weak, lambda p: OMEGA, conds, LAMBDA)
    latent = torch.zeros(2, 4, 8, 8)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(1))
    sigmas = comfy.samplers.calculate_sigmas(guider.model_patcher.get_model_object("model_sampling"), "normal", STEPS)
    with torch.inference_mode():
        return guider.sample(noise, latent, comfy.samplers.sampler_object("euler"), sigmas, seed=0)


def _load(nodes, files, personalization, weight_dtype="default", **low_rank):
    options = {"full_delta": "exact", "rank": 128, "energy": 1.0, **low_rank}
    return nodes.load_diffusion_pair.LoadDiffusionModelPair.execute(
        files["base"], weight_dtype, personalization, files["lora"] if personalization == "LoRA" else "none", 0.7,
        files["finetuned"] if personalization != "LoRA" else "none", **options).args


def test_full_and_lora_pairs_from_diffusion_model_files_sample_exactly(comfy_host, files):
    nodes, conds = comfy_host.nodes, _conds()
    base, finetuned = files["unet"]["base"], files["unet"]["finetuned"]
    pair, model = _load(nodes, files, "fine-tuned checkpoint")
    assert model is pair.finetuned
    reference.close(_sample(nodes, pair, conds),
                    _hand(finetuned, lambda o: reference.interpolate(base, finetuned, o), conds))

    lora = comfy.utils.load_torch_file(folder_paths.get_full_path_or_raise("loras", files["lora"]))
    pair, _ = _load(nodes, files, "LoRA")
    reference.close(_sample(nodes, pair, conds),
                    _hand(reference.lora_weights(base, lora, 0.7), lambda o: reference.lora_weights(base, lora, 0.7 * o),
                          conds))


def test_a_full_pair_releases_the_base_it_was_formed_from(comfy_host, files, monkeypatch):
    """A full pair holds two weight sets, theta_ft and the delta: once the loader has formed it, the base model it
    loaded is garbage, and sampling with the pair does not bring it back (a pair of GGUF files is the exception: it
    reads its base while sampling, test_gguf.py)."""
    import nodes as comfy_nodes  # ComfyUI's nodes.py, whose UNETLoader the pack's loader calls

    loaded = []
    load_unet = comfy_nodes.UNETLoader.load_unet

    def recording(self, *args, **kwargs):
        out = load_unet(self, *args, **kwargs)
        loaded.append(weakref.ref(out[0].model))
        return out

    monkeypatch.setattr(comfy_nodes.UNETLoader, "load_unet", recording)
    pair, _ = _load(comfy_host.nodes, files, "fine-tuned checkpoint")
    _sample(comfy_host.nodes, pair, _conds())
    gc.collect()
    assert len(loaded) == 2
    assert [ref() for ref in loaded if ref() is not None] == [pair.finetuned.model]


def test_fp8_weights_computed_in_fp32_sample_exactly(comfy_host, files, caplog):
    """UNETLoader's fp8_e4m3fn: weights stored in fp8, cast to fp32 on every forward (the CPU computes in fp32). The
    weak rows get weak weights formed in the compute dtype; the reference holds the very fp8 values in fp32."""
    nodes, conds = comfy_host.nodes, _conds(5)
    caplog.set_level(logging.INFO)
    pair, model = _load(nodes, files, "fine-tuned checkpoint", "fp8_e4m3fn")
    layer = model.model.get_submodule(next(iter(pair.deltas)))
    assert layer.weight.dtype == torch.float8_e4m3fn and layer.comfy_cast_weights
    stored = {f"model.{k}": v.float() for k, v in model.model.state_dict().items() if k.startswith("diffusion_model.")}
    base_model = nodes.load_diffusion_pair.comfy_nodes.UNETLoader().load_unet(files["base"], "fp8_e4m3fn")[0]
    base = {f"model.{k}": v.float() for k, v in base_model.model.state_dict().items() if k.startswith("diffusion_model.")}
    ours = _sample(nodes, pair, conds)
    assert "handlers: WeakWeights x" in caplog.text  # the cast layers take weak weights in fp32, not the correction
    reference.close(ours, _hand(stored, lambda o: reference.interpolate(base, stored, o), conds))


def test_low_rank_error_falls_with_the_rank_and_is_reported(comfy_host, files, caplog):
    """The relative error of the sampled latent against the exact pair, as a function of the rank (docs/design.md, "Memory and cost").
    The tiny fine-tune moves every weight by independent noise, the hardest case for a low rank."""
    nodes, conds = comfy_host.nodes, _conds(6)
    exact = _sample(nodes, _load(nodes, files, "fine-tuned checkpoint")[0], conds)
    errors = {}
    for rank in (4, 32, 128):
        with caplog.at_level(logging.INFO):
            caplog.clear()
            pair, _ = _load(nodes, files, "fine-tuned checkpoint", full_delta="low rank", rank=rank)
        assert pair.approximation is not None and "low-rank pair" in caplog.text
        assert f"relative error {pair.approximation.relative_error:.4f}" in caplog.text
        assert all(d.down.shape[0] <= rank for ds in pair.deltas.values() for d in ds if hasattr(d, "down"))
        errors[rank] = reference.relative_error(_sample(nodes, pair, conds), exact)
    assert errors[4] > errors[32] > errors[128] > 0, errors
    # An energy threshold alone: the fewest singular values holding 90% of each layer's delta.
    pair, _ = _load(nodes, files, "fine-tuned checkpoint", full_delta="low rank", rank=0, energy=0.9)
    assert 0.9 <= pair.approximation.kept_energy < 1.0
    # No cap and all the energy: no factors would be smaller than the delta, so nothing is approximated.
    pair, _ = _load(nodes, files, "fine-tuned checkpoint", full_delta="low rank", rank=0, energy=1.0)
    assert pair.approximation is None and torch.equal(_sample(nodes, pair, conds), exact)
    logging.getLogger(__name__).info("low-rank pair: relative error of the sampled latent by rank %s", errors)


def test_a_pair_that_cannot_fit_is_refused_with_the_figures_before_any_weight_is_read(comfy_host, files, monkeypatch):
    """The estimate (every floating tensor changed, kept in the model's dtype, plus one tensor in fp32 while forming)
    bounds what the formed pair holds; with less free memory than that the pair is refused, naming the figures, and
    neither model's weights are read."""
    import comfy.model_management

    nodes = comfy_host.nodes
    pairs = nodes.core.full_pairs
    loader = nodes.load_diffusion_pair.comfy_nodes.UNETLoader()
    base, finetuned = (loader.load_unet(files[k], "default")[0] for k in ("base", "finetuned"))
    kept, transient = pairs.plan_pair(base, finetuned).memory
    formed = pairs.pair_from_models(base, finetuned)
    assert formed.delta_bytes() <= kept
    largest = max(p.numel() for p in finetuned.model.diffusion_model.parameters())
    assert transient >= 4 * largest

    def no_reading(*args, **kwargs):
        raise AssertionError("a weight was read before the memory check")

    for model in (base, finetuned):
        monkeypatch.setattr(model, "get_key_patches", no_reading)
    free = kept + transient - 1
    monkeypatch.setattr(comfy.model_management, "get_free_memory", lambda *a, **k: free)
    with pytest.raises(comfy_host.guidance.GuidanceInputError, match=r"needs up to \d+\.\d\d GiB of system memory for the delta plus "
                                               r"\d+\.\d\d GiB while forming, and \d+\.\d\d GiB is free"):
        pairs.pair_from_models(base, finetuned)
