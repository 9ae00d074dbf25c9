"""Every model family samples exactly: LoRA and full pairs, against separately materialized models.

For each family of ``families.py`` (SD1.5, SDXL and the diffusion transformers), five
cases cover every pair of {LoRA, full fine-tune} x {constant, scheduled omega} x
{two-way, three-way} x {GUIDER, KSampler patch}, with a latent batch of 2 and prompts of
three different token lengths (ComfyUI then cannot batch them together). The pack keeps
one fine-tuned model and gives the weak rows their weights layer by layer; the
reference builds the fine-tuned and the weak model as separate models whose weights
were set by hand (theta_pre + omega * delta), evaluates each through ComfyUI's own
``calc_cond_batch``, and writes the estimate out.
"""

from __future__ import annotations

import logging

import comfy.model_management
import comfy.samplers
import comfy.sd
import families
import pytest
import reference
import torch

STEPS = 3
LAMBDA, LAMBDA_P = 4.0, 2.0
LORA_STRENGTH = 0.8
TOKENS = {"positive": 12, "null": 7, "negative": 9}
SCHEDULES = {
    "constant": dict(schedule="constant", omega=0.3, omega_end=0.3, guidance_start=0.0, guidance_end=1.0),
    "linear": dict(schedule="linear", omega=0.0, omega_end=0.9, guidance_start=0.0, guidance_end=0.7),
}
# A covering array: every pair of values of (pair, schedule, estimate, route) occurs in some case.
CASES = [
    ("lora", "constant", "two-way", "guider"),
    ("lora", "linear", "three-way", "ksampler"),
    ("full", "constant", "three-way", "ksampler"),
    ("full", "linear", "two-way", "ksampler"),
    ("full", "linear", "three-way", "guider"),
]


def _state(patcher) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in patcher.model.diffusion_model.state_dict().items()}


def _lora_delta(base: dict[str, torch.Tensor], lora: dict[str, torch.Tensor], strength: float) -> dict:
    """What the LoRA adds to each weight, written out: strength * alpha / rank * up @ down, and the ``.diff``s."""
    delta = {}
    for key, value in lora.items():
        path = key.removeprefix("diffusion_model.")
        if key.endswith(".lora_up.weight"):
            name = path[: -len(".lora_up.weight")]
            down = lora[key.replace(".lora_up.", ".lora_down.")]
            alpha = float(lora[key.replace(".lora_up.weight", ".alpha")])
            delta[f"{name}.weight"] = strength * alpha / down.shape[0] * (value @ down)
        elif key.endswith(".diff"):
            delta[f"{path[: -len('.diff')]}.weight"] = strength * value
    assert all(k in base and base[k].shape == d.shape for k, d in delta.items())
    return delta


class SeparateModels(comfy.samplers.CFGGuider):
    """The estimate on two separately built models: the fine-tuned one, and a weak one whose weights are loaded by
    hand for each omega. Both go through ComfyUI's calc_cond_batch with the conds processed for the first."""

    def __init__(self, family, ft_weights, weak_weights, schedule, conds, lam_t, lam_p=None):
        ft = family.build(seed=999)
        ft.model.diffusion_model.load_state_dict(ft_weights)
        super().__init__(ft)
        self.weak = family.build(seed=998)
        self.weak_weights, self.schedule = weak_weights, schedule
        self.lam_t, self.lam_p = lam_t, lam_p
        self.inner_set_conds({"positive": conds["positive"], "negative": conds["null"],
                              "third": conds["negative"] if lam_p is not None else conds["null"]})
        self.set_cfg(lam_t)
        self.loaded_omega = None
        self.omegas = []

    def predict_noise(self, x, timestep, model_options=None, seed=None):
        model_options = {} if model_options is None else model_options
        import guidance

        sampling = self.inner_model.model_sampling
        omega = guidance.omega_at_sigma(self.schedule, float(timestep.flatten()[0]), sampling.percent_to_sigma)
        self.omegas.append(omega)
        if omega != self.loaded_omega:
            self.weak.model.diffusion_model.load_state_dict(self.weak_weights(omega))
            self.loaded_omega = omega
        comfy.model_management.load_models_gpu([self.weak])
        self.weak.pre_run()  # as a sampling run does for its own model (calc_cond_batch asks the current patcher)

        def evaluate(model, key):
            return comfy.samplers.calc_cond_batch(model, [self.conds[key]], x, timestep, model_options)[0]

        d_c = evaluate(self.inner_model, "positive")
        d_w = evaluate(self.weak.model, "negative")
        if self.lam_p is None:
            return d_w + self.lam_t * (d_c - d_w)
        d_n = evaluate(self.inner_model, "third")
        return d_w + self.lam_p * (d_n - d_w) + self.lam_t * (d_c - d_n)


def build_pairs(family, nodes):
    """The pack's two pairs for one family's test model, each with the weights a hand-built reference needs.

    Returns (pairs, conds): pairs maps "lora" and "full" to (the pair from PairFromModels, the fine-tuned weights,
    the weak model's weights as a function of omega); conds maps each TOKENS name to a conditioning of that length.
    """
    base = family.build(seed=1)
    full = family.build(seed=1)
    families.fine_tune(full, seed=2)
    lora = families.lora_for(base, seed=3)
    lora_model = comfy.sd.load_lora_for_models(base, None, lora, LORA_STRENGTH, 0.0)[0]
    base_w, full_w = _state(base), _state(full)
    lora_d = _lora_delta(base_w, lora, LORA_STRENGTH)

    def with_lora(omega):
        return {k: v + omega * lora_d[k] if k in lora_d else v for k, v in base_w.items()}

    def interpolated(omega):
        return {k: v + omega * (full_w[k] - v) if v.is_floating_point() else v for k, v in base_w.items()}

    pairs = {
        "lora": (nodes.load_pair.PairFromModels.execute(base, lora_model).args[0], with_lora(1.0), with_lora),
        "full": (nodes.load_pair.PairFromModels.execute(base, full).args[0], full_w, interpolated),
    }
    conds = {name: family.cond(tokens, seed) for seed, (name, tokens) in enumerate(TOKENS.items(), start=10)}
    return pairs, conds


@pytest.fixture(scope="module", params=list(families.FAMILIES))
def family_setup(request, comfy_host):
    family = families.FAMILIES[request.param]
    pairs, conds = build_pairs(family, comfy_host.nodes)
    yield family, comfy_host.nodes, pairs, conds
    comfy.model_management.unload_all_models()


def _inputs(family, patcher):
    gen = torch.Generator().manual_seed(0)
    shape = family.latent_shape(2)
    sigmas = comfy.samplers.calculate_sigmas(patcher.get_model_object("model_sampling"), "simple", STEPS)
    return torch.randn(shape, generator=gen), torch.zeros(shape), sigmas


def run_pack(family, nodes, pair, conds, schedule, estimate, route):
    weak = nodes.weak_model.WeakModelInterpolator.execute(pair, **SCHEDULES[schedule]).args[0]
    est = "three-way" if estimate == "three-way" else "two-way (paper)"
    noise, latent, sigmas = _inputs(family, pair.finetuned)
    sampler = comfy.samplers.sampler_object("euler")
    negative = conds["negative"] if estimate == "three-way" else None
    with torch.inference_mode():
        if route == "guider":
            guider = nodes.guider.PersonalizationGuider.execute(
                pair.finetuned, weak, conds["positive"], conds["null"], est, LAMBDA, LAMBDA_P, negative=negative).args[0]
            return guider.sample(noise, latent, sampler, sigmas, seed=0)
        patched = nodes.model_patch.PersonalizationGuidanceModel.execute(
            pair.finetuned, weak, est, LAMBDA_P, null_conditioning=conds["null"] if negative is not None else None).args[0]
        return comfy.samplers.sample(patched, noise, conds["positive"], negative if negative is not None else conds["null"],
                                     LAMBDA, patched.load_device, sampler, sigmas, model_options=patched.model_options,
                                     latent_image=latent, seed=0)


@pytest.mark.parametrize("pair_kind,schedule,estimate,route", CASES, ids=["-".join(c) for c in CASES])
def test_family_samples_exactly(family_setup, pair_kind, schedule, estimate, route, caplog):
    family, nodes, pairs, conds = family_setup
    pair, ft_weights, weak_weights = pairs[pair_kind]
    caplog.set_level(logging.INFO)
    ours = run_pack(family, nodes, pair, conds, schedule, estimate, route)
    schedule_obj = nodes.weak_model.WeakModelInterpolator.execute(pair, **SCHEDULES[schedule]).args[0].schedule
    hand = SeparateModels(family, ft_weights, weak_weights, schedule_obj, conds, LAMBDA,
                          LAMBDA_P if estimate == "three-way" else None)
    noise, latent, sigmas = _inputs(family, hand.model_patcher)
    with torch.inference_mode():
        expected = hand.sample(noise, latent, comfy.samplers.sampler_object("euler"), sigmas, seed=0)
    assert torch.isfinite(ours).all()
    reference.close(ours, expected)
    if schedule == "linear":
        assert len(set(hand.omegas)) > 2, "the schedule should move omega during the run"
    # Far from the fine-tuned model alone as the weak model (the clone trap): the weak rows did get other weights.
    trap = SeparateModels(family, ft_weights, lambda omega: ft_weights, schedule_obj, conds, LAMBDA,
                          LAMBDA_P if estimate == "three-way" else None)
    with torch.inference_mode():
        trapped = trap.sample(noise, latent, comfy.samplers.sampler_object("euler"), sigmas, seed=0)
    assert reference.relative_error(trapped, expected) > 100 * reference.REL_TOL
    assert "weak evaluation runs in" in caplog.text


def _with_reference_latent(conditioning, latent):
    """An edit model's reference image, with the method that embeds its timestep as zero (Qwen-Image-Edit 2511)."""
    return [[c, {**extra, "reference_latents": [latent], "reference_latents_method": "index_timestep_zero"}]
            for c, extra in conditioning]


LAYOUTS = {
    # A timestep embedding for the image and for its reference: some layers see twice the batch.
    "qwen_image": lambda family, conds, shape: (
        {k: _with_reference_latent(v, torch.randn(1, *family.latent[:-2], *family.latent[-2:],
                                                  generator=torch.Generator().manual_seed(9))) for k, v in conds.items()},
        None),
    # Image to video: the first frame is kept, so the timestep differs per frame and layers see batch x frames rows.
    "wan22_5b": lambda family, conds, shape: (
        conds, torch.cat([torch.zeros(shape[0], 1, 1, *shape[3:]), torch.ones(shape[0], 1, shape[2] - 1, *shape[3:])],
                         dim=2)),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_a_row_layout_the_pack_cannot_tell_apart_moves_the_weak_evaluation_to_a_forward_of_its_own(name, comfy_host,
                                                                                                    caplog):
    """Some features make layers see another number of rows than the batch (edit references, per-frame timesteps).
    Rows are then not guessed: the weak evaluation moves to a forward of its own, where every row is the weak
    model's, and the result is exact."""
    family, nodes = families.FAMILIES[name], comfy_host.nodes
    base = family.build(seed=1)
    lora = families.lora_for(base, seed=3)
    lora_model = comfy.sd.load_lora_for_models(base, None, lora, LORA_STRENGTH, 0.0)[0]
    base_w = _state(base)
    lora_d = _lora_delta(base_w, lora, LORA_STRENGTH)

    def with_lora(omega):
        return {k: v + omega * lora_d[k] if k in lora_d else v for k, v in base_w.items()}

    pair = nodes.load_pair.PairFromModels.execute(base, lora_model).args[0]
    # Prompts of one length, so that ComfyUI batches the weak null evaluation with the fine-tuned one.
    plain = {n: family.cond(12, seed) for seed, n in enumerate(TOKENS, start=10)}
    noise, latent, sigmas = _inputs(family, pair.finetuned)
    conds, mask = LAYOUTS[name](family, plain, latent.shape)
    weak = nodes.weak_model.WeakModelInterpolator.execute(pair, **SCHEDULES["constant"]).args[0]
    guider = nodes.guider.PersonalizationGuider.execute(pair.finetuned, weak, conds["positive"], conds["null"],
                                                        "two-way (paper)", LAMBDA, LAMBDA_P).args[0]
    caplog.set_level(logging.INFO)
    with torch.inference_mode():
        ours = guider.sample(noise, latent, comfy.samplers.sampler_object("euler"), sigmas, denoise_mask=mask, seed=0)
    assert "rows cannot be told apart" in caplog.text and "moves to a forward of its own" in caplog.text
    hand = SeparateModels(family, with_lora(1.0), with_lora, weak.schedule, conds, LAMBDA)
    with torch.inference_mode():
        expected = hand.sample(noise, latent, comfy.samplers.sampler_object("euler"), sigmas, denoise_mask=mask, seed=0)
    reference.close(ours, expected)
    comfy.model_management.unload_all_models()
