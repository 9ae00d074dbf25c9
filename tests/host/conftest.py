"""The host tier: a real ComfyUI named by COMFYUI_PATH, used as a library (docs/testing.md).

Every test here is skipped when COMFYUI_PATH is unset. ComfyUI is imported once per
session, on the CPU, with its model folders pointed at a temporary directory that
holds the tiny checkpoints and LoRAs these tests build.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest

PACK_DIR = Path(__file__).resolve().parents[2]
COMFYUI_PATH = os.environ.get("COMFYUI_PATH")

if COMFYUI_PATH:
    # Before any test module imports comfy: ComfyUI first on sys.path, and on the CPU.
    sys.path.insert(0, COMFYUI_PATH)
    from comfy.cli_args import args

    args.cpu = True
else:
    # The test modules import comfy at the top; without a host only test_host_tier.py is collected, and skips.
    collect_ignore_glob = [p.name for p in Path(__file__).parent.glob("test_*.py") if p.name != "test_host_tier.py"]


@pytest.fixture(scope="session")
def comfy_host(tmp_path_factory):
    """Imports ComfyUI (CPU), loads this pack as ComfyUI does, and returns the pack's module."""
    # pytest puts the checkout's root before ComfyUI when the checkout's folder name is not a Python identifier
    # (comfyui-personalization-guidance): then this pack's nodes/ would shadow ComfyUI's nodes.py.
    sys.path.remove(COMFYUI_PATH)
    sys.path.insert(0, COMFYUI_PATH)
    import folder_paths
    import utils.extra_config  # noqa: F401  (before nodes: ComfyUI's nodes.py puts comfy/ first on sys.path)

    root = tmp_path_factory.mktemp("comfy")
    for folder in ("checkpoints", "loras", "diffusion_models", "embeddings"):
        (root / folder).mkdir()
        folder_paths.folder_names_and_paths[folder] = ([str(root / folder)], folder_paths.supported_pt_extensions)
    folder_paths.set_output_directory(str(root / "output"))
    folder_paths.set_temp_directory(str(root / "temp"))
    folder_paths.set_input_directory(str(root / "input"))
    folder_paths.set_user_directory(str(root / "user"))  # saved presets never touch a real user folder

    import nodes

    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    assert asyncio.run(nodes.load_custom_node(str(PACK_DIR))), "the pack failed to load"
    pack = sys.modules[str(PACK_DIR).replace(".", "_x_")]
    pack.models_root = root
    return pack


@pytest.fixture(scope="session")
def tiny_files(comfy_host):
    """Tiny SD1.5 checkpoints and diffusion models (base and fine-tune) and LoRAs in ComfyUI's model folders; returns
    their names."""
    import comfy.utils
    import tiny

    root = comfy_host.models_root
    extras = tiny.checkpoint_extras(seed=100)
    base = tiny.unet_state_dict(tiny.SD15_UNET, seed=1)
    finetuned = tiny.perturbed(base, seed=2, scale=0.05)
    other = tiny.unet_state_dict({**tiny.SD15_UNET, "transformer_depth_middle": 0}, seed=3)
    def bare(sd):  # a diffusion-model file: the UNet's own keys
        return {k[len("model.diffusion_model."):]: v for k, v in sd.items()}

    files = {
        "base": ("checkpoints", "tiny_sd15_base.safetensors", {**base, **extras}),
        "base_unet": ("diffusion_models", "tiny_sd15_base_unet.safetensors", bare(base)),
        "finetuned_unet": ("diffusion_models", "tiny_sd15_finetune_unet.safetensors", bare(finetuned)),
        "finetuned": ("checkpoints", "tiny_sd15_dreambooth.safetensors", {**finetuned, **extras}),
        "other": ("checkpoints", "tiny_sd15_other_arch.safetensors", {**other, **extras}),
        "lora": ("loras", "tiny_sd15_lora.safetensors", tiny.lora_for(base, seed=4)),
        "partial_lora": ("loras", "tiny_sd15_partial_lora.safetensors",
                         {**tiny.lora_for(base, seed=5, every=2), "lora_unet_no_such_layer.lora_up.weight": base[next(iter(base))][:4, :4].clone(),
                          "lora_unet_no_such_layer.lora_down.weight": base[next(iter(base))][:4, :4].clone()}),
        "alien_lora": ("loras", "tiny_alien_lora.safetensors",
                       {"lora_unet_nothing_here.lora_up.weight": base[next(iter(base))][:4, :4].clone(),
                        "lora_unet_nothing_here.lora_down.weight": base[next(iter(base))][:4, :4].clone()}),
    }
    names = {}
    for key, (folder, name, sd) in files.items():
        comfy.utils.save_torch_file(sd, str(root / folder / name))
        names[key] = name
    names["unet"] = {"base": base, "finetuned": finetuned}
    return names


@pytest.fixture(scope="session")
def family_folders(comfy_host):
    """ComfyUI's vae and text_encoders folders, in the temporary model root: the Wan 2.1 VAE (also Qwen-Image's), and a
    placeholder that CLIPLoader lists (the host tier never loads a text encoder: detectable.py says why)."""
    import detectable
    import folder_paths
    import torch

    root = comfy_host.models_root
    for folder in ("vae", "text_encoders"):
        (root / folder).mkdir()
        folder_paths.folder_names_and_paths[folder] = ([str(root / folder)], folder_paths.supported_pt_extensions)
    detectable.save(detectable.wan21_vae(seed=30), root / "vae" / "tiny_wan_2.1_vae.safetensors")
    detectable.save({"never_loaded": torch.zeros(1)}, root / "text_encoders" / "placeholder_text_encoder.safetensors")
    return {"wan_vae": "tiny_wan_2.1_vae.safetensors", "text_encoder": "placeholder_text_encoder.safetensors"}


@pytest.fixture(scope="session")
def detectable_files(comfy_host, family_folders):
    """Per family of detectable.py: the tiny base model that ComfyUI's stock loaders detect as that family, a LoRA
    for it, and its VAE, in ComfyUI's model folders; the names by family and role, and each model file's key shapes.

    SDXL comes as a checkpoint (diffusion model and VAE, no text encoder), Qwen-Image and Wan 2.1 as diffusion models
    with the Wan 2.1 VAE. Written once per session: about 1.3 GB, most of it Qwen-Image's one block in bf16."""
    import detectable

    root = comfy_host.models_root
    files, shapes = {}, {}
    for seed, family in enumerate(detectable.DETECTABLE.values(), start=31):
        patcher = family.build(seed)
        unet = patcher.model.diffusion_model.state_dict()
        lora = f"tiny_{family.name}_lora.safetensors"
        detectable.save(detectable.lora_for(patcher, seed + 10), root / "loras" / lora)
        if family is detectable.SDXL:
            base = "tiny_sdxl_base.safetensors"
            checkpoint = {f"model.diffusion_model.{k}": v for k, v in unet.items()}
            checkpoint.update({f"first_stage_model.{k}": v for k, v in detectable.sd_vae(seed + 20).items()})
            detectable.save(checkpoint, root / "checkpoints" / base)
            shapes[family.name] = {k: v.shape for k, v in unet.items()}
            files[family.name] = {"base": base, "lora": lora}
        else:
            base = f"tiny_{family.name}.safetensors"
            shapes[family.name] = detectable.save(unet, root / "diffusion_models" / base)
            files[family.name] = {"base": base, "lora": lora, "vae": family_folders["wan_vae"]}
        del patcher, unet
    return {"files": files, "shapes": shapes, "text_encoder": family_folders["text_encoder"]}
