"""The weak evaluation really uses theta_pre + omega * delta (the clone trap: docs/testing.md, "Known traps"), for every
kind of personalization: plain LoRA (low-rank, row by row), LoHa (dense fallback), full checkpoints,
and MODELs from ComfyUI's own LoraLoader, on SD1.5 and SDXL architectures."""

from __future__ import annotations

import logging
import math

import comfy.samplers
import comfy.sd
import comfy.supported_models
import reference
import tiny
import torch

OMEGA = 0.25
LAMBDA = 4.0


def _sample(guider, steps=2):
    latent = torch.zeros(1, 4, 8, 8)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(3))
    sigmas = comfy.samplers.calculate_sigmas(guider.model_patcher.get_model_object("model_sampling"), "normal", steps)
    with torch.inference_mode():
        return guider.sample(noise, latent, comfy.samplers.sampler_object("euler"), sigmas, seed=0)


def _guided(nodes, pair, conds, omega=OMEGA, lam=LAMBDA):
    weak = nodes.weak_model.WeakModelInterpolator.execute(pair, "constant", omega, omega, 0.0, 1.0).args[0]
    to_comfy = lambda c: [[c[0], {} if c[1] is None else {"pooled_output": c[1]}]]  # noqa: E731
    guider = nodes.guider.PersonalizationGuider.execute(
        pair.finetuned, weak, to_comfy(conds["c"]), to_comfy(conds["null"]), "two-way (paper)", lam, 1.0).args[0]
    return _sample(guider)


def _hand(model_class, config, ft_weights, weak_weights, conds, lam=LAMBDA):
    guider = reference.HandGuider(model_class, config, ft_weights, weak_weights, lambda p: OMEGA, conds, lam)
    return _sample(guider)


def _sd15_conds(seed=5):
    gen = torch.Generator().manual_seed(seed)
    return {k: (torch.randn(1, 77, 768, generator=gen), None) for k in ("c", "null")}


def test_weak_rows_use_interpolated_weights_not_the_clone_trap(comfy_host, tiny_files):
    """Against the reference with theta_w, and far from what the clone trap (weak == fine-tuned) would give."""
    nodes = comfy_host.nodes
    base, ft = tiny_files["unet"]["base"], tiny_files["unet"]["finetuned"]
    pair = nodes.load_pair.LoadFinetunedPair.execute(tiny_files["base"], "fine-tuned checkpoint", "none", 1.0, tiny_files["finetuned"]).args[0]
    conds = _sd15_conds()
    ours = _guided(nodes, pair, conds)
    right = _hand(comfy.supported_models.SD15, tiny.SD15_UNET, ft, lambda o: reference.interpolate(base, ft, o), conds)
    trap = _hand(comfy.supported_models.SD15, tiny.SD15_UNET, ft, lambda o: ft, conds)
    reference.close(ours, right)
    assert reference.relative_error(trap, right) > 100 * reference.REL_TOL


def test_loraloader_models_pair_low_rank(comfy_host, tiny_files):
    """Base and LoRA MODELs from ComfyUI's own LoraLoader node form a low-rank pair that samples exactly."""
    import nodes as comfy_nodes

    nodes = comfy_host.nodes
    base_model = comfy_nodes.CheckpointLoaderSimple().load_checkpoint(tiny_files["base"])[0]
    ft_model = comfy_nodes.LoraLoaderModelOnly().load_lora_model_only(base_model, tiny_files["lora"], 0.7)[0]
    pair, passthrough = nodes.load_pair.PairFromModels.execute(base_model, ft_model).args
    assert passthrough is ft_model
    assert pair.dense_fallbacks == 0
    assert all(isinstance(d, comfy_host.guidance.LowRankDelta) for ds in pair.deltas.values() for d in ds)
    import comfy.utils
    import folder_paths

    lora = comfy.utils.load_torch_file(folder_paths.get_full_path_or_raise("loras", tiny_files["lora"]))
    base = tiny_files["unet"]["base"]
    conds = _sd15_conds(6)
    ours = _guided(nodes, pair, conds)
    right = _hand(comfy.supported_models.SD15, tiny.SD15_UNET, reference.lora_weights(base, lora, 0.7),
                  lambda o: reference.lora_weights(base, lora, o * 0.7), conds)
    reference.close(ours, right)


def _loha(base: dict, seed: int, rank: int = 2) -> tuple[dict, dict]:
    """A LoHa on the attention projections, and the weights it gives at strength 1 (by hand)."""
    gen = torch.Generator().manual_seed(seed)
    lora, diffs = {}, {}
    layers = sorted(k for k in base if k.endswith(".weight") and base[k].dim() == 2 and ".attn1.to_" in k)
    for layer in layers:
        out_f, in_f = base[layer].shape
        name = "lora_unet_" + layer[len("model.diffusion_model."):-len(".weight")].replace(".", "_")
        w = {s: torch.randn(shape, generator=gen) / math.sqrt(rank) for s, shape in
             (("hada_w1_a", (out_f, rank)), ("hada_w1_b", (rank, in_f)), ("hada_w2_a", (out_f, rank)), ("hada_w2_b", (rank, in_f)))}
        for s, t in w.items():
            lora[f"{name}.{s}"] = t * 0.3
        lora[f"{name}.alpha"] = torch.tensor(float(rank))
        diffs[layer] = ((lora[f"{name}.hada_w1_a"] @ lora[f"{name}.hada_w1_b"]) * (lora[f"{name}.hada_w2_a"] @ lora[f"{name}.hada_w2_b"]))
    return lora, diffs


def test_loha_falls_back_to_an_exact_dense_delta_and_says_so(comfy_host, tiny_files, caplog):
    nodes = comfy_host.nodes
    base = tiny_files["unet"]["base"]
    lora, diffs = _loha(base, seed=8)
    base_model = tiny.model_patcher(comfy.supported_models.SD15, tiny.SD15_UNET, base)
    ft_model, _ = comfy.sd.load_lora_for_models(base_model, None, lora, 0.9, 0.0)
    with caplog.at_level(logging.INFO):
        pair = nodes.load_pair.PairFromModels.execute(base_model, ft_model).args[0]
    assert pair.dense_fallbacks == len(diffs)
    assert sum("use an exact dense delta" in r.getMessage() for r in caplog.records) == 1

    def weights(strength):
        return {k: v + strength * diffs[k] if k in diffs else v for k, v in base.items()}

    conds = _sd15_conds(9)
    reference.close(_guided(nodes, pair, conds),
                    _hand(comfy.supported_models.SD15, tiny.SD15_UNET, weights(0.9), lambda o: weights(0.9 * o), conds))


def test_sdxl_pooled_conditioning_reaches_both_evaluations(comfy_host):
    """SDXL architecture: the adm ``y`` (pooled text + size embeddings) differs between c and null, and both
    the fine-tuned and the weak evaluation must see their own."""
    nodes = comfy_host.nodes
    base = tiny.unet_state_dict(tiny.SDXL_UNET, seed=21, model_class=comfy.supported_models.SDXL)
    lora = tiny.lora_for(base, seed=22)
    base_model = tiny.model_patcher(comfy.supported_models.SDXL, tiny.SDXL_UNET, base)
    ft_model, _ = comfy.sd.load_lora_for_models(base_model, None, lora, 1.0, 0.0)
    pair = nodes.load_pair.PairFromModels.execute(base_model, ft_model).args[0]
    assert pair.deltas and pair.dense_fallbacks == 0
    gen = torch.Generator().manual_seed(23)
    pooled = {k: torch.randn(1, 1280, generator=gen) for k in ("c", "null")}
    ctx = {k: torch.randn(1, 77, 2048, generator=gen) for k in ("c", "null")}
    # The hand reference builds y itself, as SDXL's encode_adm defines it for a 64x64 image.
    adm = base_model.model
    hand_conds = {k: (ctx[k], adm.encode_adm(pooled_output=pooled[k], width=64, height=64)) for k in ("c", "null")}
    ours_conds = {k: (ctx[k], pooled[k]) for k in ("c", "null")}
    ours = _guided(nodes, pair, ours_conds)
    right = _hand(comfy.supported_models.SDXL, tiny.SDXL_UNET, reference.lora_weights(base, lora, 1.0),
                  lambda o: reference.lora_weights(base, lora, o), hand_conds)
    reference.close(ours, right)
    # Same conds but the null's pooled vector swapped for c's: the result must change.
    swapped = _guided(nodes, pair, {"c": ours_conds["c"], "null": (ctx["null"], pooled["c"])})
    assert reference.relative_error(swapped, ours) > 100 * reference.REL_TOL
