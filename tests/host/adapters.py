"""Adapters of every type ComfyUI's LoRA loaders apply, synthesized in ComfyUI's key formats
(``diffusion_model.<layer>.<adapter key>``) for the tiny SD1.5-architecture UNet of ``tiny.py``: LoRA, LoCon with a
Tucker mid weight, LoHa (plain and Tucker), LoKr (full and factored), DoRA on either axis, OFT, BOFT, GLoRA,
``.diff``/``.diff_b`` and ``w_norm``/``b_norm`` entries. Shapes follow ComfyUI's weight adapters."""

from __future__ import annotations

import math

import torch

PREFIX = "model.diffusion_model."
# Layers the adapters go on: Linear attention projections (one of them reads the 768-wide text features), a 1x1
# and a 3x3 convolution, and a norm (for the .diff entries).
LINEAR = ("input_blocks.1.1.transformer_blocks.0.attn1.to_q", "input_blocks.1.1.transformer_blocks.0.attn2.to_k",
          "output_blocks.0.1.transformer_blocks.0.ff.net.2")
CONV = ("input_blocks.1.1.proj_in", "input_blocks.1.0.in_layers.2")
NORM = ("input_blocks.1.1.norm", "output_blocks.0.1.transformer_blocks.0.norm2")


def randn(gen, *shape, scale=1.0):
    return scale * torch.randn(shape, generator=gen)


def shape_of(base: dict, layer: str) -> torch.Size:
    return base[PREFIX + layer + ".weight"].shape


def lora(base, gen, layers, mid=False, dora=None):
    out = {}
    for layer in layers:
        shape, rank = shape_of(base, layer), 2
        out_f, in_f, kernel = shape[0], shape[1], tuple(shape[2:])
        key = f"diffusion_model.{layer}"
        if mid and kernel:
            out[key + ".lora_down.weight"] = randn(gen, rank, in_f, 1, 1, scale=1 / math.sqrt(in_f))
            out[key + ".lora_mid.weight"] = randn(gen, rank, rank, *kernel, scale=0.3)
        else:
            out[key + ".lora_down.weight"] = randn(gen, rank, in_f, *kernel, scale=1 / math.sqrt(in_f * math.prod(kernel)))
        out[key + ".lora_up.weight"] = randn(gen, out_f, rank, *[1] * len(kernel), scale=0.3)
        out[key + ".alpha"] = torch.tensor(1.0)
        if dora == "output":
            out[key + ".dora_scale"] = 1.0 + randn(gen, out_f, *[1] * (len(shape) - 1), scale=0.1)
        elif dora == "input":
            out[key + ".dora_scale"] = 1.0 + randn(gen, 1, in_f, *[1] * len(kernel), scale=0.1)
    return out


def loha(base, gen, tucker=False):
    out = {}
    for layer in (*LINEAR, CONV[1]):
        shape, rank = shape_of(base, layer), 2
        key = f"diffusion_model.{layer}"
        for i in (1, 2):
            if tucker and len(shape) == 4:
                out[f"{key}.hada_t{i}"] = randn(gen, rank, rank, *shape[2:], scale=0.3)
                out[f"{key}.hada_w{i}_a"] = randn(gen, rank, shape[0], scale=0.3)  # Tucker: rank x out
                out[f"{key}.hada_w{i}_b"] = randn(gen, rank, shape[1], scale=0.3)  # and rank x in
            else:
                out[f"{key}.hada_w{i}_a"] = randn(gen, shape[0], rank, scale=0.3)
                out[f"{key}.hada_w{i}_b"] = randn(gen, rank, math.prod(shape[1:]), scale=0.3)
        out[key + ".alpha"] = torch.tensor(float(rank))
    return out


def lokr(base, gen, factored=False):
    out = {}
    for layer in LINEAR:
        out_f, in_f = shape_of(base, layer)
        key = f"diffusion_model.{layer}"
        a, b = (4, out_f // 4), (4, in_f // 4)
        out[key + ".lokr_w1"] = randn(gen, a[0], b[0], scale=0.3)
        if factored:
            out[key + ".lokr_w2_a"] = randn(gen, a[1], 2, scale=0.3)
            out[key + ".lokr_w2_b"] = randn(gen, 2, b[1], scale=0.3)
            out[key + ".alpha"] = torch.tensor(2.0)
        else:
            out[key + ".lokr_w2"] = randn(gen, a[1], b[1], scale=0.05)
    return out


def oft(base, gen, butterfly=False, alpha=True):
    out = {}
    for layer in LINEAR[:2]:
        out_f = shape_of(base, layer)[0]
        key = f"diffusion_model.{layer}"
        if butterfly:  # boft_m factors of out_f / block_size blocks of block_size
            out[key + ".oft_blocks"] = randn(gen, 2, out_f // 4, 4, 4, scale=0.05)
        else:
            out[key + ".oft_blocks"] = randn(gen, out_f // 8, 8, 8, scale=0.05)
        if alpha:
            out[key + ".alpha"] = torch.tensor(0.0)
    return out


def glora(base, gen):
    out = {}
    for layer in LINEAR:
        out_f, in_f = shape_of(base, layer)
        key = f"diffusion_model.{layer}"
        # LyCORIS's GLoRA layout as ComfyUI reads it: b2 @ b1 + (W @ a2) @ a1.
        out[key + ".a1.weight"] = randn(gen, 2, in_f, scale=0.1)
        out[key + ".a2.weight"] = randn(gen, in_f, 2, scale=0.1)
        out[key + ".b1.weight"] = randn(gen, 2, in_f, scale=0.1)
        out[key + ".b2.weight"] = randn(gen, out_f, 2, scale=0.1)
        out[key + ".alpha"] = torch.tensor(2.0)
    return out


def diffs(base, gen, norms=False):
    out = {}
    for layer in NORM:
        key = f"diffusion_model.{layer}"
        n = shape_of(base, layer)[0]
        if norms:
            out[key + ".w_norm"] = randn(gen, n, scale=0.1)
            out[key + ".b_norm"] = randn(gen, n, scale=0.1)
        else:
            out[key + ".diff"] = randn(gen, n, scale=0.1)
            out[key + ".diff_b"] = randn(gen, n, scale=0.1)
    return out


ADAPTERS = {
    "lora": lambda b, g: lora(b, g, (*LINEAR, *CONV)),
    "locon_tucker": lambda b, g: lora(b, g, CONV, mid=True),
    "loha": lambda b, g: loha(b, g),
    "loha_tucker": lambda b, g: loha(b, g, tucker=True),
    "lokr": lambda b, g: lokr(b, g),
    "lokr_factored": lambda b, g: lokr(b, g, factored=True),
    "dora_output_axis": lambda b, g: lora(b, g, LINEAR, dora="output"),
    "dora_input_axis": lambda b, g: lora(b, g, LINEAR, dora="input"),
    "oft": lambda b, g: oft(b, g),
    "boft": lambda b, g: oft(b, g, butterfly=True),
    "glora": glora,
    "diff": lambda b, g: diffs(b, g),
    "w_norm": lambda b, g: diffs(b, g, norms=True),
}


