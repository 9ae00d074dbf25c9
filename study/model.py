"""A small conditional denoiser D(x, sigma, prompt) with EDM preconditioning.

The network is a three-level convolutional UNet. As in Stable Diffusion, the noise
level modulates every residual block (scale and shift) and the prompt enters by
cross-attention: after each residual block, every pixel attends to the prompt's
four token embeddings (one embedding table per slot), so that the object's pixels
can read the object's words and the background's pixels the background's. Every
layer with weights is an Embedding, Linear, Conv2d or LayerNorm. Normalization is
per pixel (over channels), not over the picture, so that a background's brightness
does not change how the object's pixels are normalized.

Preconditioning follows Karras et al. (2022), "Elucidating the design space":
D(x, sigma) = c_skip x + c_out F(c_in x, c_noise), with sigma_data = 0.5 for
pictures in [-1, 1]. D predicts the clean picture, the "denoised" prediction that
ComfyUI guides on.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SIGMA_DATA = 0.5
P_MEAN_DEFAULT = -1.2


class PixelNorm(nn.Module):
    """LayerNorm over the channels of each pixel."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ResBlock(nn.Module):
    """Norm, SiLU, conv; scale-and-shift by the noise level; norm, SiLU, conv; plus the input."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int):
        super().__init__()
        self.norm1 = PixelNorm(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.film = nn.Linear(emb_dim, 2 * c_out)
        self.norm2 = PixelNorm(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.film(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(F.silu(h))
        return self.skip(x) + h


class CrossAttention(nn.Module):
    """Single-head attention from the pixels (queries) to the prompt's token embeddings (keys and values)."""

    def __init__(self, channels: int, token_dim: int):
        super().__init__()
        self.norm = PixelNorm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Linear(token_dim, channels)
        self.v = nn.Linear(token_dim, channels)
        self.out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor, text: Tensor) -> Tensor:
        n, c, h, w = x.shape
        q = self.q(self.norm(x)).flatten(2).transpose(1, 2)  # (N, HW, C)
        k, v = self.k(text), self.v(text)  # (N, T, C)
        attn = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(c), dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(n, c, h, w)
        return x + self.out(out)


class UNet(nn.Module):
    """F(x, c_noise, tokens): 16x16 -> 8x8 -> 4x4 and back, with skip connections and cross-attention."""

    def __init__(self, vocab_sizes: tuple[int, ...], width: int = 32, token_dim: int = 32, emb_dim: int = 128):
        super().__init__()
        w = width
        self.tokens = nn.ModuleList(nn.Embedding(v, token_dim) for v in vocab_sizes)
        self.register_buffer("freqs", torch.exp(torch.linspace(0, math.log(64), 16)), persistent=False)
        self.noise = nn.Sequential(nn.Linear(32, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.conv_in = nn.Conv2d(3, w, 3, padding=1)
        self.down1 = ResBlock(w, w, emb_dim)
        self.pool1 = nn.Conv2d(w, 2 * w, 3, stride=2, padding=1)
        self.down2 = ResBlock(2 * w, 2 * w, emb_dim)
        self.pool2 = nn.Conv2d(2 * w, 2 * w, 3, stride=2, padding=1)
        self.mid1 = ResBlock(2 * w, 2 * w, emb_dim)
        self.mid2 = ResBlock(2 * w, 2 * w, emb_dim)
        self.up2 = ResBlock(4 * w, 2 * w, emb_dim)
        self.up1 = ResBlock(3 * w, w, emb_dim)
        self.attn_down1 = CrossAttention(w, token_dim)
        self.attn_down2 = CrossAttention(2 * w, token_dim)
        self.attn_mid = CrossAttention(2 * w, token_dim)
        self.attn_up2 = CrossAttention(2 * w, token_dim)
        self.attn_up1 = CrossAttention(w, token_dim)
        self.norm_out = PixelNorm(w)
        self.conv_out = nn.Conv2d(w, 3, 3, padding=1)

    def forward(self, x: Tensor, c_noise: Tensor, tokens: Tensor) -> Tensor:
        text = torch.stack([emb(tokens[:, i]) for i, emb in enumerate(self.tokens)], dim=1)  # (N, slots, D)
        angles = c_noise[:, None] * self.freqs[None]
        emb = F.silu(self.noise(torch.cat([angles.sin(), angles.cos()], dim=1)))
        h1 = self.attn_down1(self.down1(self.conv_in(x), emb), text)
        h2 = self.attn_down2(self.down2(self.pool1(h1), emb), text)
        h = self.mid2(self.attn_mid(self.mid1(self.pool2(h2), emb), text), emb)
        h = F.interpolate(h, scale_factor=2, mode="nearest")
        h = self.attn_up2(self.up2(torch.cat([h, h2], dim=1), emb), text)
        h = F.interpolate(h, scale_factor=2, mode="nearest")
        h = self.attn_up1(self.up1(torch.cat([h, h1], dim=1), emb), text)
        return self.conv_out(F.silu(self.norm_out(h)))


def precondition(sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """EDM's (c_skip, c_out, c_in, c_noise) for noise levels ``sigma`` of shape (N,)."""
    var = sigma**2 + SIGMA_DATA**2
    c_skip = SIGMA_DATA**2 / var
    c_out = sigma * SIGMA_DATA / var.sqrt()
    c_in = 1 / var.sqrt()
    return c_skip, c_out, c_in, sigma.log() / 4


class Denoiser(nn.Module):
    """D(x, sigma, tokens): the clean-picture estimate of the noisy picture ``x`` at noise level ``sigma``."""

    def __init__(self, vocab_sizes: tuple[int, ...], width: int = 32):
        super().__init__()
        self.net = UNet(vocab_sizes, width=width)

    def forward(self, x: Tensor, sigma: Tensor, tokens: Tensor) -> Tensor:
        sigma = sigma.expand(x.shape[0])  # one noise level for the batch, or one per row
        c_skip, c_out, c_in, c_noise = precondition(sigma)
        out = self.net(x * c_in.view(-1, 1, 1, 1), c_noise, tokens)
        return c_skip.view(-1, 1, 1, 1) * x + c_out.view(-1, 1, 1, 1) * out


def loss(model: Denoiser, clean: Tensor, tokens: Tensor, generator: torch.Generator,
         p_mean: float | None = None, p_std: float = 1.2) -> Tensor:
    """EDM's weighted denoising loss at log-normal noise levels: lambda(sigma) |D(x + n, sigma) - x|^2."""
    n = clean.shape[0]
    p_mean = P_MEAN_DEFAULT if p_mean is None else p_mean
    sigma = (torch.randn(n, generator=generator) * p_std + p_mean).exp()
    noisy = clean + torch.randn(clean.shape, generator=generator) * sigma.view(-1, 1, 1, 1)
    weight = (sigma**2 + SIGMA_DATA**2) / (sigma * SIGMA_DATA) ** 2
    err = (model(noisy, sigma, tokens) - clean) ** 2
    return (weight.view(-1, 1, 1, 1) * err).mean()
