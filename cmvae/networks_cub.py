"""The CUBICC networks of the reference (DESIGN section 2), with a channel-width multiplier, and the per-modality
factory that picks a network family from what a modality holds.

- Images of 32 or 64 pixels: the ResNet family of the 28x28 networks grown by pooling stages down to 2x2 (64: five
  stages, channels 64 -> 128 -> 256 -> 256 -> 256 -> 256). 28x28 images use the PolyMNIST networks (networks.py).
- Captions (token ids [B, L], L a multiple of 8, reference L = 32): a linear embedding of the one-hot tokens to
  128, conv towers with BatchNorm and ReLU; the decoder is ConvTranspose towers for w and z, joined, back to
  [B, 1, L, 128], then a linear map to the vocabulary (logits; the likelihood is categorical).

Every encoder returns (z_loc, z_raw_scale, w_loc, w_raw_scale) and has `tower_z` (input -> (loc, raw scale)) as the
PolyMNIST Encoder does, so clustering, the warm start and pruning call any of them alike. Decoders map
concat(w, z) [N, Dw + Dz] to the image location [N, C, H, W] or the caption logits [N, L, V].

At width 1.0 the parameter counts are the reference's (tests/test_networks_cub.py): image encoder 8,618,048 and
decoder 4,309,699 (Dz 64, Dw 32), caption encoder 2,764,416 and decoder 3,358,167 (vocabulary 1590, L 32).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from cmvae_engine.cmvae.networks import NEG_SLOPE, Decoder, Encoder, ResBlock

CUB_IMAGE_SIZES = (32, 64)
BOTTOM = 2  # spatial size the CUBICC image towers pool down to
EMBEDDING = 128  # caption embedding width; the towers' strides assume it (128 / 32 = 4 columns at the bottom)
TEXT_BASE = 32  # fBase of the caption networks
HAS_BATCHNORM = "has_batchnorm"
"""Attribute set on decoders whose training-mode output depends on which rows share a call (BatchNorm)."""


def _scaled(c: int, width: float) -> int:
    return max(1, round(c * width))


def image_channels(size: int, width: float = 1.0) -> list[int]:
    """Channels at each resolution from size down to 2: 64 * 2^i capped at 256, scaled by width."""
    if size not in CUB_IMAGE_SIZES:
        raise ValueError(f"the CUBICC image networks take {CUB_IMAGE_SIZES} pixels, got {size}")
    stages = int(math.log2(size // BOTTOM))
    return [_scaled(min(64 * 2**i, 256), width) for i in range(stages + 1)]


class CubImageTower(nn.Module):
    """conv3x3 C -> c0, RB(c0, c0), then per stage AvgPool(3, 2, 1) and RB(c_i, c_i+1), flatten, two linear heads."""

    def __init__(self, latent_dim: int, size: int = 64, width: float = 1.0, in_channels: int = 3):
        super().__init__()
        ch = image_channels(size, width)
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ch[0], 3, padding=1), ResBlock(ch[0], ch[0])]
        for a, b in zip(ch[:-1], ch[1:], strict=True):
            layers += [nn.AvgPool2d(3, 2, 1), ResBlock(a, b)]
        layers.append(nn.Flatten())
        self.body = nn.Sequential(*layers)
        flat = ch[-1] * BOTTOM * BOTTOM
        self.loc = nn.Linear(flat, latent_dim)
        self.raw_scale = nn.Linear(flat, latent_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.body(x)
        return self.loc(h), self.raw_scale(h)


class CubImageEncoder(nn.Module):
    def __init__(self, z_dim: int, w_dim: int, size: int = 64, width: float = 1.0, in_channels: int = 3):
        super().__init__()
        self.tower_w = CubImageTower(w_dim, size, width, in_channels)
        self.tower_z = CubImageTower(z_dim, size, width, in_channels)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        z_loc, z_raw = self.tower_z(x)
        w_loc, w_raw = self.tower_w(x)
        return z_loc, z_raw, w_loc, w_raw


class CubImageDecoder(nn.Module):
    """Linear(Dw + Dz -> c_last * 2 * 2), per stage RB(c_i+1, c_i) and nearest x2, RB(c0, c0), conv3x3 after the
    activation. No output non-linearity (Laplace location), as the reference."""

    def __init__(self, z_dim: int, w_dim: int, size: int = 64, width: float = 1.0, out_channels: int = 3):
        super().__init__()
        ch = image_channels(size, width)
        self.top = ch[-1]
        self.fc = nn.Linear(w_dim + z_dim, self.top * BOTTOM * BOTTOM)
        layers: list[nn.Module] = []
        for a, b in zip(ch[:0:-1], ch[-2::-1], strict=True):
            layers += [ResBlock(a, b), nn.Upsample(scale_factor=2, mode="nearest")]
        layers.append(ResBlock(ch[0], ch[0]))
        self.body = nn.Sequential(*layers)
        self.out = nn.Conv2d(ch[0], out_channels, 3, padding=1)

    def forward(self, wz: torch.Tensor) -> torch.Tensor:
        h = self.fc(wz).view(-1, self.top, BOTTOM, BOTTOM)
        return self.out(F.leaky_relu(self.body(h), NEG_SLOPE))


# ---------------------------------------------------------------------------------------------- captions


def _check_length(length: int) -> None:
    if length < 8 or length % 8:
        raise ValueError(f"the caption networks take lengths that are multiples of 8 (reference 32), got {length}")


def _conv_bn(cin: int, cout: int, k, s, p) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, k, s, p), nn.BatchNorm2d(cout), nn.ReLU()]


def _deconv_bn(cin: int, cout: int, k, s, p) -> list[nn.Module]:
    return [nn.ConvTranspose2d(cin, cout, k, s, p), nn.BatchNorm2d(cout), nn.ReLU()]


class _Embed(nn.Module):
    """The reference's Linear(V -> 128) on one-hot captions, computed as a lookup of its weight's columns (the same
    values and gradients; no [B, L, V] one-hot tensor)."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.linear = nn.Linear(vocab_size, EMBEDDING)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.embedding(tokens.long(), self.linear.weight.t()) + self.linear.bias


class CaptionTower(nn.Module):
    """Embedding [B, 1, L, 128], three conv(4, 2, 1) + BN + ReLU stages (f, 2f, 4f channels -> L/8 x 16); the z tower
    adds two (1, 4)/(1, 2) stages (8f, 16f -> L/8 x 4) and convolutional heads over the whole remaining map, the w
    tower linear heads over the flattened map (the reference's shapes)."""

    def __init__(self, embed: _Embed, latent_dim: int, length: int, width: float, deep: bool):
        super().__init__()
        _check_length(length)
        f = _scaled(TEXT_BASE, width)
        self.embed = embed  # shared by both towers of an encoder, as the reference's one embedding
        layers = _conv_bn(1, f, 4, 2, 1) + _conv_bn(f, 2 * f, 4, 2, 1) + _conv_bn(2 * f, 4 * f, 4, 2, 1)
        self.deep = deep
        if deep:
            layers += _conv_bn(4 * f, 8 * f, (1, 4), (1, 2), (0, 1)) + _conv_bn(8 * f, 16 * f, (1, 4), (1, 2), (0, 1))
            self.loc = nn.Conv2d(16 * f, latent_dim, (length // 8, 4))
            self.raw_scale = nn.Conv2d(16 * f, latent_dim, (length // 8, 4))
        else:
            flat = 4 * f * (length // 8) * (EMBEDDING // 8)
            self.loc = nn.Linear(flat, latent_dim)
            self.raw_scale = nn.Linear(flat, latent_dim)
        self.body = nn.Sequential(*layers)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.body(self.embed(tokens).unsqueeze(1))
        if not self.deep:
            h = h.flatten(1)
        return self.loc(h).flatten(1), self.raw_scale(h).flatten(1)


class CaptionEncoder(nn.Module):
    def __init__(self, z_dim: int, w_dim: int, vocab_size: int, length: int = 32, width: float = 1.0):
        super().__init__()
        embed = _Embed(vocab_size)
        self.tower_w = CaptionTower(embed, w_dim, length, width, deep=False)
        self.tower_z = CaptionTower(embed, z_dim, length, width, deep=True)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        z_loc, z_raw = self.tower_z(tokens)
        w_loc, w_raw = self.tower_w(tokens)
        return z_loc, z_raw, w_loc, w_raw


class CaptionDecoder(nn.Module):
    """w and z each through ConvTranspose + BN + ReLU towers to 4f x L/8 x 16, joined on channels, three stride-2
    ConvTranspose stages and a last one to 1 x L x 128 (ReLU), then Linear(128 -> V): logits [N, L, V]."""

    has_batchnorm = True

    def __init__(self, z_dim: int, w_dim: int, vocab_size: int, length: int = 32, width: float = 1.0):
        super().__init__()
        _check_length(length)
        f = _scaled(TEXT_BASE, width)
        rows = length // 8
        self.w_dim, self.z_dim, self.length, self.vocab_size = w_dim, z_dim, length, vocab_size
        self.dec_w = nn.Sequential(
            *_deconv_bn(w_dim, 16 * f, (rows, 4), 1, 0), *_deconv_bn(16 * f, 8 * f, (1, 4), (1, 2), (0, 1)),
            *_deconv_bn(8 * f, 4 * f, (1, 4), (1, 2), (0, 1)))
        self.dec_z = nn.Sequential(
            *_deconv_bn(z_dim, 16 * f, (rows, 4), 1, 0), *_deconv_bn(16 * f, 8 * f, (1, 4), (1, 2), (0, 1)),
            *_deconv_bn(8 * f, 8 * f, 3, 1, 1), *_deconv_bn(8 * f, 4 * f, (1, 4), (1, 2), (0, 1)))
        self.dec_h = nn.Sequential(
            *_deconv_bn(8 * f, 4 * f, 3, 1, 1), *_deconv_bn(4 * f, 2 * f, 4, 2, 1), *_deconv_bn(2 * f, f, 4, 2, 1),
            nn.ConvTranspose2d(f, 1, 4, 2, 1), nn.ReLU())
        self.to_vocab = nn.Linear(EMBEDDING, vocab_size)

    def forward(self, wz: torch.Tensor) -> torch.Tensor:
        w, z = wz.split([self.w_dim, self.z_dim], dim=-1)
        h = torch.cat([self.dec_w(w[:, :, None, None]), self.dec_z(z[:, :, None, None])], dim=1)
        out = self.dec_h(h)  # [N, 1, L, 128]
        return self.to_vocab(out.squeeze(1))  # [N, L, V]


# ---------------------------------------------------------------------------------------------- factory


def build_encoder(spec: dict, z_dim: int, w_dim: int, width: float) -> nn.Module:
    """The encoder of one modality from its model spec (cmvae/hetero.py `modality_spec`)."""
    if spec["kind"] == "text":
        return CaptionEncoder(z_dim, w_dim, spec["vocab_size"], spec["length"], width)
    channels, size = spec["channels"], spec["size"]
    if size == 28:
        return Encoder(z_dim, w_dim, width, channels)
    return CubImageEncoder(z_dim, w_dim, size, width, channels)


def build_decoder(spec: dict, z_dim: int, w_dim: int, width: float) -> nn.Module:
    if spec["kind"] == "text":
        return CaptionDecoder(z_dim, w_dim, spec["vocab_size"], spec["length"], width)
    channels, size = spec["channels"], spec["size"]
    if size == 28:
        return Decoder(z_dim, w_dim, width, channels)
    return CubImageDecoder(z_dim, w_dim, size, width, channels)


def has_batchnorm(module: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())
