"""GGUF models loaded by the ComfyUI-GGUF custom nodes (city96): pairs sample exactly as the same graph on fp32 files
that hold the weights as ComfyUI-GGUF dequantizes them, and a full pair holds the two quantized models, not a delta.

ComfyUI-GGUF is loaded into the host as ComfyUI loads any custom node, from the checkout named by
``COMFYUI_GGUF_PATH`` (with the ``gguf`` package installed); the tests skip without it. The pack itself never imports
ComfyUI-GGUF. Files are written by ``gguf_files`` in ComfyUI-GGUF's layout, from the tiny SD1.5-architecture UNet
(loaded by "Unet Loader (GGUF)", which detects it) and from tiny Flux.2, Qwen-Image and Wan 2.1 models (built as
ComfyUI-GGUF builds a detected model: its layer classes, its ModelPatcher, its state-dict reader).
"""

from __future__ import annotations

import asyncio
import os
import sys

import comfy.model_management
import comfy.model_patcher
import comfy.samplers
import comfy.sd
import comfy.supported_models
import comfy.utils
import families
import pytest
import reference
import torch

GGUF_PATH = os.environ.get("COMFYUI_GGUF_PATH")
OMEGA = 0.4
LAMBDA = 4.0
QTYPES = ("F16", "BF16", "Q8_0", "Q5_K", "Q4_0", "Q4_K")


@pytest.fixture(scope="module")
def gguf(comfy_host):
    """ComfyUI-GGUF's nodes module, loaded into the host as ComfyUI loads a custom node."""
    if not GGUF_PATH:
        pytest.skip("GGUF cases need a ComfyUI-GGUF checkout named by COMFYUI_GGUF_PATH and the gguf package "
                    "(docs/testing.md)")
    import nodes

    if "UnetLoaderGGUF" not in nodes.NODE_CLASS_MAPPINGS:
        assert asyncio.run(nodes.load_custom_node(GGUF_PATH)), "ComfyUI-GGUF failed to load"
    return sys.modules[nodes.NODE_CLASS_MAPPINGS["UnetLoaderGGUF"].__module__]


@pytest.fixture(scope="module")
def setup(comfy_host, tiny_files, gguf):
    import gguf_files

    folder = comfy_host.models_root / "diffusion_models"
    gen = torch.Generator().manual_seed(61)
    return {"nodes": comfy_host.nodes, "guidance": comfy_host.guidance, "gguf": gguf, "files": gguf_files,
            "folder": folder, "unet": tiny_files["unet"], "tiny_files": tiny_files,
            "conds": {k: [[torch.randn(1, 77, 768, generator=gen), {}]] for k in ("c", "null")}}


def _sd15_files(setup, role: str, qtype: str) -> tuple[str, str]:
    """The tiny SD1.5 UNet ``role`` (base or finetuned) as a GGUF file of ``qtype``, and an fp32 file holding its
    values as ComfyUI-GGUF computes with them; their names in the diffusion_models folder."""
    name = f"tiny_sd15_{role}_{qtype}"
    path = setup["folder"] / f"{name}.gguf"
    if not path.exists():
        setup["files"].write_gguf(path, setup["unet"][role], qtype, "sd1")
        comfy.utils.save_torch_file(setup["files"].runtime_state_dict(path), str(setup["folder"] / f"{name}.safetensors"))
    return f"{name}.gguf", f"{name}.safetensors"


def _gguf_unet(setup, name: str, advanced: dict | None = None):
    mapping = __import__("nodes").NODE_CLASS_MAPPINGS
    if advanced is None:
        return mapping["UnetLoaderGGUF"]().load_unet(name)[0]
    return mapping["UnetLoaderGGUFAdvanced"]().load_unet(name, **advanced)[0]


def _fp32_unet(name: str):
    import nodes as comfy_nodes

    return comfy_nodes.UNETLoader().load_unet(name, "default")[0]


def _sample(setup, pair, omega=OMEGA, conds=None, latent=None, ksampler=False, route=None, on_top=None):
    """Two-way guidance with omega rising from ``omega`` to 1: the Personalization Guider, the KSampler patch, or
    (``route``) the runtime told where the weak evaluation runs; ``on_top``: a LoRA file put on the pair's fine-tuned
    MODEL first (a MODEL made from it)."""
    import nodes as comfy_nodes

    nodes = setup["nodes"]
    conds = conds or setup["conds"]
    model = pair.finetuned
    if on_top is not None:
        model = comfy_nodes.LoraLoaderModelOnly().load_lora_model_only(model, on_top, 0.5)[0]
    weak = nodes.weak_model.WeakModelInterpolator.execute(pair, "linear", omega, 1.0, 0.0, 1.0).args[0]
    latent = torch.zeros(1, 4, 8, 8) if latent is None else latent
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(3))
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "simple", 3)
    if ksampler or route is not None:
        if route is not None:
            config = nodes.core.vocabulary.GuidanceConfig(weak=weak, route=route)
            patched = nodes.core.runtime.attach(model, config)
        else:
            patched = nodes.model_patch.PersonalizationGuidanceModel.execute(model, weak, "two-way (paper)").args[0]
        guider = comfy.samplers.CFGGuider(patched)
        guider.set_conds(conds["c"], conds["null"])
        guider.set_cfg(LAMBDA)
    else:
        guider = nodes.guider.PersonalizationGuider.execute(model, weak, conds["c"], conds["null"], "two-way (paper)",
                                                            LAMBDA, 1.0).args[0]
    with torch.inference_mode():
        return guider.sample(noise, latent, comfy.samplers.sampler_object("euler"), sigmas, seed=0)


def _exact(setup, ours, theirs, **sample):
    """``ours`` (a pair on GGUF models) samples as ``theirs`` (the same pair on fp32 files); omega + 0.2 does not."""
    expected = _sample(setup, theirs, **sample)
    reference.close(_sample(setup, ours, **sample), expected)
    assert reference.relative_error(_sample(setup, ours, omega=OMEGA + 0.2, **sample), expected) > 100 * reference.REL_TOL


def _pair(setup, base, finetuned, full_delta="exact"):
    return setup["nodes"].load_pair.PairFromModels.execute(base, finetuned, full_delta).args[0]


@pytest.mark.parametrize("qtype", QTYPES)
def test_a_full_pair_of_two_gguf_files_is_exact_and_keeps_no_delta(setup, qtype):
    base_gguf, base_ref = _sd15_files(setup, "base", qtype)
    ft_gguf, ft_ref = _sd15_files(setup, "finetuned", qtype)
    base, finetuned = _gguf_unet(setup, base_gguf), _gguf_unet(setup, ft_gguf)
    pair = _pair(setup, base, finetuned)
    # The pair reads the base as each layer runs: what it keeps is at most the small F32 tensors' delta.
    assert pair.reads_base is base
    quantized = sum(setup["nodes"].core.host.true_shape(p).numel() for p in finetuned.model.diffusion_model.parameters())
    assert pair.delta_bytes() < 0.05 * 4 * quantized
    _exact(setup, pair, _pair(setup, _fp32_unet(base_ref), _fp32_unet(ft_ref)))


@pytest.mark.parametrize("gguf_side", ["base", "finetuned"])
def test_a_mixed_pair_of_gguf_and_safetensors_is_exact(setup, gguf_side):
    files = {role: _sd15_files(setup, role, "Q4_K") for role in ("base", "finetuned")}
    models = {role: _gguf_unet(setup, files[role][0]) if role == gguf_side else _fp32_unet(files[role][1])
              for role in files}
    pair = _pair(setup, models["base"], models["finetuned"])
    _exact(setup, pair, _pair(setup, _fp32_unet(files["base"][1]), _fp32_unet(files["finetuned"][1])))


def test_gguf_pairs_through_the_ksampler_patch_a_forward_of_its_own_and_a_lora_on_top(setup):
    files = {role: _sd15_files(setup, role, "Q8_0") for role in ("base", "finetuned")}
    pair = _pair(setup, _gguf_unet(setup, files["base"][0]), _gguf_unet(setup, files["finetuned"][0]))
    theirs = _pair(setup, _fp32_unet(files["base"][1]), _fp32_unet(files["finetuned"][1]))
    _exact(setup, pair, theirs, ksampler=True)
    _exact(setup, pair, theirs, route=setup["nodes"].core.vocabulary.Route.OWN_FORWARD)
    # A MODEL made from the pair's, with a style LoRA on top: its weak model is that MODEL plus (omega - 1) delta.
    _exact(setup, pair, theirs, on_top=setup["tiny_files"]["lora"])


def test_the_advanced_loaders_dequantization_dtype_is_followed(setup):
    import gguf_files

    base_gguf, _ = _sd15_files(setup, "base", "Q8_0")
    ft_gguf, _ = _sd15_files(setup, "finetuned", "Q8_0")
    advanced = {"dequant_dtype": "float32", "patch_dtype": "default", "patch_on_device": False}
    try:
        base, finetuned = _gguf_unet(setup, base_gguf, advanced), _gguf_unet(setup, ft_gguf, advanced)
        # ComfyUI-GGUF's advanced loader sets the dequantization dtype on its Linear class only: Linear weights
        # dequantize in fp32 arithmetic, the others as the basic loader does (fp16).
        linear = {f"{path}.{name}" for path, m in base.model.diffusion_model.named_modules()
                  if isinstance(m, torch.nn.Linear) for name in ("weight", "bias")}
        refs = []
        for role, name in (("base", base_gguf), ("finetuned", ft_gguf)):
            ref = f"tiny_sd15_{role}_Q8_0_dequant_fp32.safetensors"
            fp16, fp32 = (gguf_files.runtime_state_dict(setup["folder"] / name, dequant_dtype=d)
                          for d in (None, torch.float32))
            values = {k: fp32[k] if k in linear else v for k, v in fp16.items()}
            assert any(not torch.equal(fp16[k], fp32[k]) for k in linear if k in fp16)  # the dtype is seen
            comfy.utils.save_torch_file(values, str(setup["folder"] / ref))
            refs.append(_fp32_unet(ref))
        _exact(setup, _pair(setup, base, finetuned), _pair(setup, *refs))
    finally:  # the advanced loader sets its dtypes on ComfyUI-GGUF's shared Linear class: back to the default
        _gguf_unet(setup, base_gguf)


def test_the_low_rank_option_on_gguf_files(setup):
    files = {role: _sd15_files(setup, role, "Q8_0") for role in ("base", "finetuned")}
    low_rank = {"full_delta": "low rank", "rank": 8, "energy": 1.0}
    pair = _pair(setup, _gguf_unet(setup, files["base"][0]), _gguf_unet(setup, files["finetuned"][0]), low_rank)
    assert pair.reads_base is None and pair.approximation is not None
    theirs = _pair(setup, _fp32_unet(files["base"][1]), _fp32_unet(files["finetuned"][1]), low_rank)
    _exact(setup, pair, theirs)


@pytest.mark.parametrize("kind", ["lora", "loha", "lokr"])
def test_adapters_on_a_gguf_base(setup, kind, caplog):
    """A LoRA keeps its batched low-rank route; LoHa and LoKr, which ComfyUI applies to the dequantized weight, are
    read through the layer (never from the raw bytes) and keep no dense delta for packed weights."""
    import adapters

    base_gguf, base_ref = _sd15_files(setup, "base", "Q4_K")
    lora = adapters.ADAPTERS[kind](setup["unet"]["base"], torch.Generator().manual_seed(62))
    load = setup["nodes"].core.lora_pairs.load_lora_pair
    pair, _ = load(_gguf_unet(setup, base_gguf), None, lora, 0.8, f"{kind}.safetensors")
    theirs, _ = load(_fp32_unet(base_ref), None, lora, 0.8, f"{kind}.safetensors")
    assert not [r for r in caplog.records if r.levelname == "ERROR"]
    _exact(setup, pair, theirs)


def test_a_gguf_pair_that_cannot_fit_is_refused_with_figures(setup, monkeypatch):
    files = {role: _sd15_files(setup, role, "Q4_K") for role in ("base", "finetuned")}
    base, finetuned = (_gguf_unet(setup, files[role][0]) for role in ("base", "finetuned"))
    plan = setup["nodes"].core.full_pairs.plan_pair(base, finetuned)
    kept, transient = plan.memory
    largest = max(setup["nodes"].core.host.true_shape(p).numel() for p in finetuned.model.diffusion_model.parameters())
    assert transient >= 3 * 4 * largest  # both sides of the largest layer in fp32, and more
    monkeypatch.setattr(comfy.model_management, "get_free_memory", lambda *a, **k: kept + transient - 1)
    with pytest.raises(setup["guidance"].GuidanceInputError, match=r"needs up to .* GiB is free"):
        _pair(setup, base, finetuned)


# ---------------------------------------------------------------------------------------------- diffusion transformers
DITS = {"flux2": "flux", "qwen_image": "qwen_image", "wan21": "wan"}


def _dit_model(setup, family, sd: dict, qtype: str | None, name: str):
    """``sd`` as a GGUF file of ``qtype`` loaded as ComfyUI-GGUF loads a detected model, or (qtype None) as an fp32
    model holding the values of the GGUF file ``name`` as ComfyUI-GGUF computes with them."""
    gguf = setup["gguf"]
    path = setup["folder"] / f"{name}.gguf"
    if qtype is not None:
        setup["files"].write_gguf(path, sd, qtype, DITS[family.name], shape_fix=True)
        state = gguf.gguf_sd_loader(str(path))
    else:
        state = setup["files"].runtime_state_dict(path)
    config = getattr(comfy.supported_models, family.model_class)(dict(family.config))
    config.set_inference_dtype(torch.float32, None)
    if qtype is not None:
        config.custom_operations = gguf.GGMLOps
    model = config.get_model({})
    model.load_model_weights(state, "")
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))
    return gguf.GGUFModelPatcher.clone(patcher) if qtype is not None else patcher


@pytest.mark.parametrize("family_name", sorted(DITS))
@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_K"])
def test_diffusion_transformer_pairs_on_gguf(setup, family_name, qtype):
    family = families.FAMILIES[family_name]
    built = family.build(seed=71)
    base_sd = {k: v.clone() for k, v in built.model.diffusion_model.state_dict().items()}
    families.fine_tune(built, seed=72)
    ft_sd = built.model.diffusion_model.state_dict()
    names = {role: f"tiny_{family_name}_{role}_{qtype}" for role in ("base", "finetuned")}
    ours = {role: _dit_model(setup, family, sd, qtype, names[role]) for role, sd in (("base", base_sd),
                                                                                       ("finetuned", ft_sd))}
    refs = {role: _dit_model(setup, family, None, None, names[role]) for role in ours}
    conds = {"c": family.cond(12, 73), "null": family.cond(7, 74)}
    latent = torch.zeros(family.latent_shape(1))
    _exact(setup, _pair(setup, ours["base"], ours["finetuned"]), _pair(setup, refs["base"], refs["finetuned"]),
           conds=conds, latent=latent)
    # A LoRA on the GGUF base, as on the fp32 one.
    lora = families.lora_for(refs["base"], seed=75)
    load = setup["nodes"].core.lora_pairs.load_lora_pair
    _exact(setup, load(ours["base"], None, lora, 1.0, "lora")[0], load(refs["base"], None, lora, 1.0, "lora")[0],
           conds=conds, latent=latent)
