"""Tiny random-weight model files that ComfyUI's *stock* loaders detect as SDXL, Qwen-Image and Wan 2.1.

``families.py`` builds any shrunk config directly (``supported_models.X(config)``); a
file for CheckpointLoaderSimple or UNETLoader must instead survive ComfyUI's model
detection, which reads a few sizes from the state dict and takes the rest from the
family's fixed defaults. The configs below are the smallest that detection rebuilds
exactly (same ``supported_models`` class, same keys, same shapes), in ComfyUI v0.8.0 and
0.33.0 alike (``comfy/model_detection.py``, ``detect_unet_config``):

- SDXL pins ``model_channels`` 320, ``context_dim`` 2048, ``adm_in_channels`` 2816 and
  ``transformer_depth`` [0, 0, 2, 2, 10, 10]: 24 transformer blocks 320 wide; the channel
  multipliers and the output and middle blocks are free. 134M parameters.
- Qwen-Image reads only ``in_channels`` and the number of blocks; the width (3072, 24
  heads) and the text width (3584) are the model's defaults. One block is 340M of its
  380M parameters, stored in bf16 (725 MiB). Zero blocks would be 40M, but then the
  prompt never reaches the image: the one block is what makes the guidance mean something.
- Wan 2.1 text to video reads the width (one head of 128 per 128), the depth and the
  channels; the text width stays the default 4096. 0.9M parameters.

VAEs (VAELoader, or a checkpoint's ``first_stage_model``): the SD/SDXL AutoencoderKL is
fixed at full size in v0.8.0 (84M, fp16); the Wan 2.1 VAE (also Qwen-Image's) takes its
width from the file, so 8 channels make it 0.9M.

No text encoder can be made tiny: CLIPLoader and the checkpoint loader build fixed
configs (CLIP-L + CLIP-G, Qwen2.5-VL 7B, UMT5-XXL) whatever the file holds. ``conditioning``
gives what their CLIPTextEncode gives, at the widths these models read, for a test-only
node that stands in for the text encoder (``test_example_workflows_host.py``).

Values depend only on the seed and each tensor's name (``families.init_weights``), so both
ComfyUI versions write the same files.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from pathlib import Path

import comfy.ldm.models.autoencoder
import comfy.ldm.wan.vae
import comfy.model_detection
import comfy.model_patcher
import comfy.supported_models
import comfy.utils
import families
import torch


@dataclass(frozen=True)
class Detectable:
    """A family's smallest config that ComfyUI's detection rebuilds exactly, and what its text encoder gives."""

    name: str
    model_class: str  # in comfy.supported_models, and what detection must find
    config: dict
    dtype: torch.dtype  # of the file
    context: int  # width of the text encoder's hidden states, which the model's cross-attention reads
    tokens: int  # as the real encoder gives them for a short prompt
    pooled: int | None = None  # width of the pooled output (SDXL: CLIP-G's projection, read with the size embeddings)

    def build(self, seed: int) -> comfy.model_patcher.ModelPatcher:
        """The model with seeded weights, built in the file's dtype (nothing full-size in fp32)."""
        model_config = getattr(comfy.supported_models, self.model_class)(dict(self.config))
        model_config.set_inference_dtype(self.dtype, None)
        model = model_config.get_model({})
        families.init_weights(model.diffusion_model, seed)
        return comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))

    def conditioning(self, text: str) -> list:
        """CONDITIONING as CLIPTextEncode gives it with the family's text encoder: a function of the text."""
        seed = zlib.crc32(text.encode())
        extras = {"pooled_output": None if self.pooled is None else families._randn((1, self.pooled), seed, "pooled")}
        return [[families._randn((1, self.tokens, self.context), seed, "cond"), extras]]


SDXL = Detectable(
    "sdxl", "SDXL",
    {"use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
     "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4, "out_channels": 4,
     "model_channels": 320, "use_linear_in_transformer": True, "context_dim": 2048, "use_temporal_resblock": False,
     "use_temporal_attention": False, "num_res_blocks": [2, 2, 2], "channel_mult": [1, 1, 1],
     "transformer_depth": [0, 0, 2, 2, 10, 10], "transformer_depth_output": [0] * 9, "transformer_depth_middle": -1},
    torch.float16, context=2048, tokens=77, pooled=1280)  # CLIP-L ++ CLIP-G, 77 tokens
QWEN_IMAGE = Detectable(
    "qwen_image", "QwenImage", {"image_model": "qwen_image", "in_channels": 64, "num_layers": 1},
    torch.bfloat16, context=3584, tokens=16)  # Qwen2.5-VL 7B
WAN21 = Detectable(
    "wan21", "WAN21_T2V",
    {"image_model": "wan2.1", "model_type": "t2v", "dim": 128, "num_heads": 1, "ffn_dim": 256, "num_layers": 1,
     "in_dim": 16, "out_dim": 16, "text_dim": 4096, "patch_size": (1, 2, 2), "freq_dim": 256,
     "window_size": (-1, -1), "qk_norm": True, "cross_attn_norm": True, "eps": 1e-6},
    torch.float16, context=4096, tokens=16)  # UMT5-XXL
DETECTABLE = {d.name: d for d in (SDXL, QWEN_IMAGE, WAN21)}


def detected_exactly(family: Detectable, shapes: dict[str, torch.Size]) -> str | None:
    """Why ComfyUI's detection does not rebuild ``family`` from a file with these bare keys and shapes, or None."""
    meta = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    model_config = comfy.model_detection.model_config_from_unet(meta, "")
    if type(model_config).__name__ != family.model_class:
        return f"detected as {type(model_config).__name__}"
    expected = model_config.get_model({}, device=torch.device("meta")).diffusion_model.state_dict()
    loaded = model_config.process_unet_state_dict(dict(meta))
    differ = sorted(k for k in expected.keys() | loaded.keys()
                    if k not in expected or k not in loaded or expected[k].shape != loaded[k].shape)
    return f"{len(differ)} tensors differ, first {differ[:3]}" if differ else None


def lora_for(patcher: comfy.model_patcher.ModelPatcher, seed: int) -> dict[str, torch.Tensor]:
    """A subject LoRA as trainers write them: rank 4 on every Linear (``families.lora_for``'s, norms left alone)."""
    return {k: v for k, v in families.lora_for(patcher, seed).items() if not k.endswith(".diff")}


@torch.no_grad()
def sd_vae(seed: int) -> dict[str, torch.Tensor]:
    """The SD/SDXL AutoencoderKL (v0.8.0 fixes its size: 84M), fp16, keyed as VAELoader reads it."""
    ddconfig = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
    vae = families.init_weights(comfy.ldm.models.autoencoder.AutoencoderKL(ddconfig=ddconfig, embed_dim=4), seed)
    return {k: v.half() for k, v in vae.state_dict().items()}


@torch.no_grad()
def wan21_vae(seed: int, dim: int = 8) -> dict[str, torch.Tensor]:
    """The Wan 2.1 VAE (Qwen-Image's too) at ``dim`` channels (96 in the released one), fp16."""
    vae = comfy.ldm.wan.vae.WanVAE(dim=dim, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                                   temperal_downsample=[False, True, True], dropout=0.0)
    families.init_weights(vae, seed)
    for name, p in vae.named_parameters():
        if name.endswith(".gamma"):  # RMS_norm gains, shaped (C, 1, 1[, 1])
            p.copy_(1.0 + 0.02 * families._randn(p.shape, seed, name))
    return {k: v.half() for k, v in vae.state_dict().items()}


def save(sd: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Size]:
    """Write ``sd`` as safetensors; return its shapes (the tensors can then be freed)."""
    comfy.utils.save_torch_file(sd, str(path))
    return {k: v.shape for k, v in sd.items()}


def parameters(shapes: dict[str, torch.Size]) -> int:
    return sum(math.prod(s) for s in shapes.values())


__all__ = ["DETECTABLE", "Detectable", "QWEN_IMAGE", "SDXL", "WAN21", "detected_exactly", "lora_for", "parameters",
           "save", "sd_vae", "wan21_vae"]
