"""Tiny random-weight models of real architectures, built with ComfyUI's own classes.

Nothing is downloaded: every tensor is drawn from a seeded generator here.
"""

from __future__ import annotations

import contextlib
import math

import comfy.model_patcher
import comfy.sd
import comfy.supported_models
import comfy.utils
import torch

# The smallest SD1.5 UNet that ComfyUI still detects as SD15 (docs/testing.md, "Tiny models").
SD15_UNET = {
    "context_dim": 768,
    "model_channels": 320,
    "use_linear_in_transformer": False,
    "adm_in_channels": None,
    "use_temporal_attention": False,
    "in_channels": 4,
    "out_channels": 4,
    "num_res_blocks": [1],
    "channel_mult": [1],
    "transformer_depth": [1],
    "transformer_depth_output": [1, 1],
    "transformer_depth_middle": 1,
    "use_spatial_transformer": True,
    "legacy": False,
    "image_size": 32,
    "use_checkpoint": False,
    "use_temporal_resblock": False,
    "num_heads": 8,
    "num_head_channels": -1,
}

# An SDXL-architecture UNet (pooled text and size embeddings through adm ``y``), shrunk.
SDXL_UNET = {
    "context_dim": 2048,
    "model_channels": 64,
    "use_linear_in_transformer": True,
    "adm_in_channels": 2816,
    "num_classes": "sequential",
    "use_temporal_attention": False,
    "in_channels": 4,
    "out_channels": 4,
    "num_res_blocks": [1],
    "channel_mult": [1],
    "transformer_depth": [1],
    "transformer_depth_output": [1, 1],
    "transformer_depth_middle": 1,
    "use_spatial_transformer": True,
    "legacy": False,
    "image_size": 32,
    "use_checkpoint": False,
    "use_temporal_resblock": False,
    "num_heads": -1,
    "num_head_channels": 32,
}


def init_weights_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Fill the weights that ``comfy.ops`` leaves uninitialized: fan-in scaled normals, norms at 1."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() >= 2:
                fan_in = math.prod(p.shape[1:])
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(fan_in))
            elif name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))
    return module


def unet_state_dict(config: dict, seed: int, model_class=comfy.supported_models.SD15) -> dict[str, torch.Tensor]:
    """A random UNet state dict, keyed as a checkpoint stores it (``model.diffusion_model.…``)."""
    model = model_class(dict(config)).get_model({})
    init_weights_(model.diffusion_model, seed)
    return {"model." + k: v.clone() for k, v in model.state_dict().items() if k.startswith("diffusion_model.")}


def perturbed(sd: dict[str, torch.Tensor], seed: int, scale: float = 0.05, fraction_keys: float = 1.0) -> dict[str, torch.Tensor]:
    """A "fine-tune" of ``sd``: every (or a fraction of the) floating tensor(s) moved by relative noise."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for i, (k, v) in enumerate(sorted(sd.items())):
        if v.is_floating_point() and (i % max(1, round(1 / fraction_keys)) == 0):
            out[k] = v + scale * v.std().clamp_min(1e-3) * torch.randn(v.shape, generator=gen)
        else:
            out[k] = v.clone()
    return out


def model_patcher(model_class, config: dict, unet_sd: dict[str, torch.Tensor]) -> comfy.model_patcher.ModelPatcher:
    """A ModelPatcher around a freshly built BaseModel holding ``unet_sd`` (checkpoint keys)."""
    model_config = model_class(dict(config))
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model({})
    missing, unexpected = model.load_state_dict({k[len("model."):]: v for k, v in unet_sd.items()}, strict=False)
    assert not unexpected and not [k for k in missing if k.startswith("diffusion_model.")], (missing, unexpected)
    return comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))


def lora_for(unet_sd: dict[str, torch.Tensor], seed: int, rank: int = 4, every: int = 1) -> dict[str, torch.Tensor]:
    """A LoRA (``lora_unet_…`` keys, up/down/alpha) on the attention and projection layers of ``unet_sd``.

    ``every`` keeps one layer in that many, for partial LoRAs.
    """
    gen = torch.Generator().manual_seed(seed)
    lora = {}
    layers = sorted(k[: -len(".weight")] for k, v in unet_sd.items() if k.endswith(".weight") and v.dim() in (2, 4)
                    and (".attn" in k or "proj_" in k or "ff.net" in k or "in_layers.2" in k))
    for i, layer in enumerate(layers):
        if i % every:
            continue
        w = unet_sd[layer + ".weight"]
        name = "lora_unet_" + layer[len("model.diffusion_model."):].replace(".", "_")
        out_f, in_f = w.shape[0], w.shape[1]
        kernel = tuple(w.shape[2:])
        lora[name + ".lora_down.weight"] = torch.randn((rank, in_f, *kernel), generator=gen) / math.sqrt(in_f * math.prod(kernel))
        lora[name + ".lora_up.weight"] = 0.5 * torch.randn((out_f, rank, *[1] * len(kernel)), generator=gen) / math.sqrt(rank)
        lora[name + ".alpha"] = torch.tensor(float(rank) / 2)
    return lora


def checkpoint_extras(seed: int) -> dict[str, torch.Tensor]:
    """Random SD1.x CLIP-L text encoder and VAE tensors, keyed as in a checkpoint, stored in fp16.

    They are full size (ComfyUI fixes their configs) but only need to be finite.
    """
    import comfy.ldm.models.autoencoder
    import comfy.sd1_clip

    clip = init_weights_(comfy.sd1_clip.SDClipModel(device="cpu", dtype=torch.float32), seed)
    ddconfig = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
    vae = init_weights_(comfy.ldm.models.autoencoder.AutoencoderKL(ddconfig=ddconfig, embed_dim=4), seed + 1)
    out = {}
    for prefix, module in (("cond_stage_model.", clip), ("first_stage_model.", vae)):
        for k, v in module.state_dict().items():
            out[prefix + k] = v.half() if v.is_floating_point() else v
    return out


@contextlib.contextmanager
def partial_load(model: torch.nn.Module, fraction: int = 3):
    """ComfyUI loads a model partially when VRAM is short: some layers then cast their weights on every forward and
    apply LoRA patches on the fly. A CPU never loads partially, so ComfyUI is told that 1/``fraction`` of ``model``
    (a BaseModel) fits; the rest is ComfyUI's own low-VRAM code. Every model is unloaded before and after."""
    import comfy.model_management

    partially_load = comfy.model_patcher.ModelPatcher.partially_load

    def short_of_memory(self, device_to, extra_memory=0, *args, **kwargs):
        if self.model is model:
            extra_memory = min(extra_memory, self.model_size() // fraction)
        return partially_load(self, device_to, extra_memory, *args, **kwargs)

    comfy.model_management.unload_all_models()
    comfy.model_patcher.ModelPatcher.partially_load = short_of_memory
    try:
        yield
    finally:
        comfy.model_patcher.ModelPatcher.partially_load = partially_load
        comfy.model_management.unload_all_models()
