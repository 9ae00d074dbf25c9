"""Tiny random-weight models of every model family in scope, built with ComfyUI's own classes.

``comfy.supported_models.<Family>(config).get_model({})`` with a shrunk config (one block
of each kind, widths 64-256), weights filled here from a seeded generator (``comfy.ops``
leaves them uninitialized), and the conditioning each family's ``extra_conds`` reads.
The same config builds in ComfyUI v0.8.0 and 0.33.0, and a tensor's values depend only
on the seed and its name, so both versions build identical weights (v0.8.0 names the
Flux-family q/k norm parameters ``scale``, 0.33 ``weight``: seeded by the 0.33 name).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import comfy.model_patcher
import comfy.supported_models
import torch


def _generator(seed: int, name: str = "") -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1000003 + zlib.crc32(name.encode())) % 2**63)


def _randn(shape, seed: int, name: str = "", std: float = 1.0) -> torch.Tensor:
    return torch.randn(shape, generator=_generator(seed, name)) * std


def _mask(tokens: int) -> torch.Tensor:
    return torch.ones((1, tokens), dtype=torch.long)


# Conditioning as ComfyUI's text encoders produce it (tiny widths; the real widths in the comments).
def _flux2(tokens, seed):  # Qwen3 hidden states of 3 layers (7680 for Klein 4B); padded to 512 by extra_conds
    return [[_randn((1, tokens, 96), seed), {"pooled_output": None, "attention_mask": _mask(tokens)}]]


def _t5(width):  # T5 / UMT5 / Qwen2.5-VL hidden states (4096 / 4096 / 3584)
    return lambda tokens, seed: [[_randn((1, tokens, width), seed), {"pooled_output": None}]]


def _sd3(tokens, seed):  # CLIP-L + CLIP-G + T5 (4096 wide), pooled CLIP-L ++ CLIP-G (2048)
    return [[_randn((1, tokens, 96), seed), {"pooled_output": _randn((1, 64), seed, "pooled")}]]


def _lumina(tokens, seed):  # Gemma-2 (2304) / Qwen3 (2560) hidden states with their attention mask
    return [[_randn((1, tokens, 96), seed), {"pooled_output": None, "attention_mask": _mask(tokens)}]]


def _hidream(tokens, seed):  # T5 (4096), Llama-3.1 layers (32 x 4096), pooled CLIP-L ++ CLIP-G (2048)
    return [[_randn((1, tokens, 64), seed), {"pooled_output": _randn((1, 64), seed, "pooled"),
                                              "conditioning_llama3": _randn((1, 2, tokens + 3, 96), seed, "llama")}]]


def _hunyuan(tokens, seed):  # Qwen2.5-VL (3584) and ByT5 glyph tokens (1472, fixed by the model)
    return [[_randn((1, tokens, 96), seed), {"pooled_output": None,
                                              "conditioning_byt5small": _randn((1, 4, 1472), seed, "byt5")}]]


def _sd15(tokens, seed):  # CLIP-L (768)
    return [[_randn((1, tokens, 64), seed), {"pooled_output": _randn((1, 64), seed, "pooled")}]]


def _sdxl(tokens, seed):  # CLIP-L ++ CLIP-G (2048), pooled CLIP-G (1280) and the size embeddings
    return [[_randn((1, tokens, 64), seed), {"pooled_output": _randn((1, 64), seed, "pooled"), "width": 128,
                                              "height": 128}]]


@dataclass(frozen=True)
class Family:
    name: str
    model_class: str  # in comfy.supported_models
    config: dict
    latent: tuple[int, ...]  # channels, [frames,] height, width of one latent
    cond: Callable[[int, int], list]  # (tokens, seed) -> CONDITIONING

    def build(self, seed: int) -> comfy.model_patcher.ModelPatcher:
        """A ModelPatcher on the CPU around a freshly built model with seeded random weights (fp32)."""
        model_config = getattr(comfy.supported_models, self.model_class)(dict(self.config))
        model_config.set_inference_dtype(torch.float32, None)
        model = model_config.get_model({})
        init_weights(model.diffusion_model, seed)
        return comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))

    def latent_shape(self, batch: int) -> tuple[int, ...]:
        return (batch, *self.latent)


FAMILIES = {f.name: f for f in (
    # Flux.2 Klein base: no guidance embedding, real CFG.
    Family("flux2", "Flux2", {
        "image_model": "flux2", "in_channels": 128, "out_channels": 128, "patch_size": 1, "hidden_size": 128,
        "num_heads": 4, "axes_dim": [8, 8, 8, 8], "theta": 2000, "mlp_ratio": 3.0, "depth": 1,
        "depth_single_blocks": 1, "context_in_dim": 96, "vec_in_dim": None, "guidance_embed": False,
        "global_modulation": True, "mlp_silu_act": True, "qkv_bias": False, "ops_bias": False,
        "default_ref_method": "index", "ref_index_scale": 10.0, "txt_ids_dims": [3], "yak_mlp": False,
        "txt_norm": False}, (128, 8, 8), _flux2),
    Family("chroma", "Chroma", {
        "image_model": "chroma", "in_channels": 64, "out_channels": 64, "patch_size": 2, "hidden_size": 128,
        "num_heads": 4, "axes_dim": [8, 12, 12], "theta": 10000, "mlp_ratio": 4.0, "depth": 1,
        "depth_single_blocks": 1, "qkv_bias": True, "context_in_dim": 64, "vec_in_dim": None, "txt_ids_dims": [],
        "in_dim": 64, "out_dim": 128, "hidden_dim": 64, "n_layers": 1}, (16, 16, 16), _t5(64)),
    Family("qwen_image", "QwenImage", {
        "image_model": "qwen_image", "in_channels": 64, "out_channels": 16, "patch_size": 2, "num_layers": 1,
        "attention_head_dim": 32, "num_attention_heads": 4, "joint_attention_dim": 96,
        "axes_dims_rope": (8, 12, 12)}, (16, 1, 16, 16), _t5(96)),
    # SD3.5 Medium: q/k RMSNorm and an MMDiT-X self-attention block.
    Family("sd3", "SD3", {
        "in_channels": 16, "out_channels": 16, "patch_size": 2, "depth": 2, "input_size": None, "adm_in_channels": 64,
        "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": 96, "out_features": 128}},
        "num_patches": 256, "pos_embed_max_size": 16, "pos_embed_scaling_factor": None, "qk_norm": "rms",
        "x_block_self_attn_layers": [0]}, (16, 16, 16), _sd3),
    # Wan 2.1 text to video (also the architecture of Wan 2.2 A14B).
    Family("wan21", "WAN21_T2V", {
        "image_model": "wan2.1", "model_type": "t2v", "dim": 128, "num_heads": 2, "ffn_dim": 256, "num_layers": 1,
        "in_dim": 16, "out_dim": 16, "text_dim": 96, "patch_size": (1, 2, 2), "freq_dim": 256, "window_size": (-1, -1),
        "qk_norm": True, "cross_attn_norm": True, "eps": 1e-6}, (16, 3, 8, 8), _t5(96)),
    Family("wan22_5b", "WAN22_T2V", {
        "image_model": "wan2.1", "model_type": "t2v", "dim": 128, "num_heads": 2, "ffn_dim": 256, "num_layers": 1,
        "in_dim": 48, "out_dim": 48, "text_dim": 96, "patch_size": (1, 2, 2), "freq_dim": 256, "window_size": (-1, -1),
        "qk_norm": True, "cross_attn_norm": True, "eps": 1e-6}, (48, 3, 8, 8), _t5(96)),
    Family("lumina2", "Lumina2", {
        "image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": 128, "cap_feat_dim": 96, "n_layers": 1,
        "n_refiner_layers": 1, "qk_norm": True, "n_heads": 4, "n_kv_heads": 2, "axes_dims": [8, 12, 12],
        "axes_lens": [300, 512, 512], "rope_theta": 10000.0, "ffn_dim_multiplier": 4.0}, (16, 16, 16), _lumina),
    # Z-Image: its adaLN needs a width of at least 256; pad tokens round sequences to multiples of 32.
    Family("zimage", "ZImage", {
        "image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": 256, "cap_feat_dim": 96, "n_layers": 1,
        "n_refiner_layers": 1, "qk_norm": True, "n_heads": 4, "n_kv_heads": 4, "axes_dims": [16, 24, 24],
        "axes_lens": [1536, 512, 512], "rope_theta": 256.0, "ffn_dim_multiplier": 8.0 / 3.0,
        "z_image_modulation": True, "time_scale": 1000.0, "pad_tokens_multiple": 32}, (16, 16, 16), _lumina),
    Family("hidream", "HiDream", {
        "image_model": "hidream", "attention_head_dim": 32, "axes_dims_rope": [16, 8, 8], "caption_channels": [64, 96],
        "max_resolution": [128, 128], "in_channels": 16, "llama_layers": [0, 1], "num_attention_heads": 4,
        "num_routed_experts": 4, "num_activated_experts": 2, "num_layers": 1, "num_single_layers": 1,
        "out_channels": 16, "patch_size": 2, "text_emb_dim": 64}, (16, 16, 16), _hidream),
    Family("hunyuan_video15", "HunyuanVideo15", {
        "image_model": "hunyuan_video", "in_channels": 65, "out_channels": 32, "patch_size": [1, 1, 1],
        "vec_in_dim": None, "axes_dim": [8, 12, 12], "meanflow": False, "context_in_dim": 96, "hidden_size": 128,
        "mlp_ratio": 4.0, "num_heads": 4, "depth": 1, "depth_single_blocks": 1, "theta": 256, "qkv_bias": True,
        "byt5": True, "guidance_embed": False, "use_cond_type_embedding": True, "vision_in_dim": 64,
        "meanflow_sum": True}, (32, 2, 8, 8), _hunyuan),
    Family("hunyuan_image21", "HunyuanImage21", {
        "image_model": "hunyuan_video", "in_channels": 64, "out_channels": 64, "patch_size": [1, 1],
        "vec_in_dim": None, "axes_dim": [16, 16], "meanflow": False, "context_in_dim": 96, "hidden_size": 128,
        "mlp_ratio": 4.0, "num_heads": 4, "depth": 1, "depth_single_blocks": 1, "theta": 256, "qkv_bias": True,
        "byt5": True, "guidance_embed": False, "use_cond_type_embedding": False, "vision_in_dim": None,
        "meanflow_sum": False}, (64, 8, 8), _hunyuan),
    Family("sd15", "SD15", {
        "use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
        "adm_in_channels": None, "in_channels": 4, "out_channels": 4, "model_channels": 32, "num_res_blocks": [1, 1],
        "transformer_depth": [1, 1], "transformer_depth_output": [1, 1, 1, 1], "channel_mult": [1, 2],
        "transformer_depth_middle": 1, "use_linear_in_transformer": False, "context_dim": 64,
        "use_temporal_resblock": False, "use_temporal_attention": False}, (4, 16, 16), _sd15),
    Family("sdxl", "SDXL", {
        "use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
        "num_classes": "sequential", "adm_in_channels": 64 + 6 * 256, "in_channels": 4, "out_channels": 4,
        "model_channels": 32, "num_res_blocks": [1, 1], "transformer_depth": [0, 1],
        "transformer_depth_output": [0, 0, 1, 1], "channel_mult": [1, 2], "transformer_depth_middle": 1,
        "use_linear_in_transformer": True, "context_dim": 64, "use_temporal_resblock": False,
        "use_temporal_attention": False}, (4, 16, 16), _sdxl),
)}


def _canonical(name: str) -> str:
    return name[: -len(".scale")] + ".weight" if name.endswith(".scale") else name


@torch.no_grad()
def init_weights(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter from (seed, its name): fan-in scaled normals, norm gains near 1, small biases; bare
    parameters (modulation tables, pad tokens) scaled by their width; SD3's positional buffer small."""
    for name, p in module.named_parameters():
        g = _generator(seed, _canonical(name))
        leaf = name.rpartition(".")[2]
        owner = module.get_submodule(name.rpartition(".")[0]) if "." in name else module
        if leaf in ("weight", "scale") and p.dim() == 1:
            values = 1.0 + 0.02 * torch.randn(p.shape, generator=g)
        elif leaf == "bias":
            values = 0.02 * torch.randn(p.shape, generator=g)
        elif leaf == "weight" and p.dim() >= 2 and not isinstance(owner, torch.nn.Embedding):
            values = torch.randn(p.shape, generator=g) / math.sqrt(math.prod(p.shape[1:]))
        elif leaf == "weight":
            values = torch.randn(p.shape, generator=g)
        else:
            values = torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1])
        p.copy_(values.to(p.dtype))
    for name, b in module.named_buffers():
        if name.endswith("pos_embed") and b.is_floating_point():
            b.copy_(0.02 * torch.randn(b.shape, generator=_generator(seed, name)))
    return module


@torch.no_grad()
def fine_tune(patcher: comfy.model_patcher.ModelPatcher, seed: int, scale: float = 0.05) -> None:
    """A "full fine-tune" in place: every parameter of the diffusion model moved by relative noise."""
    for name, p in patcher.model.diffusion_model.named_parameters():
        spread = float(p.float().std()) if p.numel() > 1 else 1.0
        p.add_(scale * (spread or 1.0) * torch.randn(p.shape, generator=_generator(seed, "ft." + _canonical(name))))


def lora_for(patcher: comfy.model_patcher.ModelPatcher, seed: int, rank: int = 4) -> dict[str, torch.Tensor]:
    """A LoRA on every Linear of the diffusion model (generic ``diffusion_model.<layer>`` keys, which
    ``comfy.lora.model_lora_keys_unet`` maps for every family), plus a ``.diff`` on every 1-D norm weight."""
    lora = {}
    for name, m in patcher.model.diffusion_model.named_modules():
        weight = getattr(m, "weight", None)
        if not isinstance(weight, torch.Tensor):
            continue
        key = f"diffusion_model.{name}"
        if isinstance(m, torch.nn.Linear):
            out_f, in_f = weight.shape
            lora[f"{key}.lora_down.weight"] = _randn((rank, in_f), seed, key + ".down") / math.sqrt(in_f)
            lora[f"{key}.lora_up.weight"] = _randn((out_f, rank), seed, key + ".up") * 0.5 / math.sqrt(rank)
            lora[f"{key}.alpha"] = torch.tensor(rank / 2)
        elif weight.dim() == 1 and "norm" in name.rpartition(".")[2].lower():
            lora[f"{key}.diff"] = _randn(weight.shape, seed, key + ".diff", 0.05)
    return lora


__all__ = ["FAMILIES", "Family", "fine_tune", "init_weights", "lora_for"]
