"""The PolyMNIST encoder and decoder networks of the paper, with a channel-width multiplier.

width=1.0 is the reference (2,946,048 parameters per encoder, 1,485,251 per decoder). Smaller widths
scale every channel count and exist so that CPU demos and tests run in minutes; results from them are
labelled as reduced wherever they are written.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cmvae_engine.cmvae.upsampled_conv import upsampled_block

NEG_SLOPE = 0.2  # leaky_relu slope of the reference
IMAGE_SIZE = 28
BOTTOM = 7  # spatial size after two stride-2 pools


def channels(width: float) -> tuple[int, int, int]:
    """Channel counts (64, 128, 256) scaled by width, at least 1 each."""
    if not width > 0:
        raise ValueError(f"width must be positive, got {width}")
    return tuple(max(1, round(c * width)) for c in (64, 128, 256))  # type: ignore[return-value]


def _act(x: torch.Tensor) -> torch.Tensor:
    return F.leaky_relu(x, NEG_SLOPE)


def _act_(x: torch.Tensor) -> torch.Tensor:
    """In place, for an input nothing else reads: autograd then keeps one tensor (the output, from which the
    slope > 0 backward is exact) instead of input and output; the same values."""
    return F.leaky_relu(x, NEG_SLOPE, inplace=True)


class ResBlock(nn.Module):
    """Pre-activation residual block: shortcut(x) + 0.1 * conv(act(conv(act(x))))."""

    def __init__(self, fin: int, fout: int):
        super().__init__()
        hidden = min(fin, fout)
        self.conv0 = nn.Conv2d(fin, hidden, 3, padding=1)
        self.conv1 = nn.Conv2d(hidden, fout, 3, padding=1)
        self.shortcut = nn.Conv2d(fin, fout, 1, bias=False) if fin != fout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = x if self.shortcut is None else self.shortcut(x)
        return skip + 0.1 * self.conv1(_act_(self.conv0(_act(x))))


class Tower(nn.Module):
    """One encoder tower: image -> (loc, raw scale) of a D-dim latent."""

    def __init__(self, latent_dim: int, width: float = 1.0, in_channels: int = 3):
        super().__init__()
        c1, c2, c3 = channels(width)
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, c1, 3, padding=1),
            ResBlock(c1, c1),
            nn.AvgPool2d(3, 2, 1),
            ResBlock(c1, c2),
            nn.AvgPool2d(3, 2, 1),
            ResBlock(c2, c3),
            nn.Flatten(),
        )
        # No activation between the last block and the heads, as the reference.
        self.loc = nn.Linear(c3 * BOTTOM * BOTTOM, latent_dim)
        self.raw_scale = nn.Linear(c3 * BOTTOM * BOTTOM, latent_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.body(x)
        return self.loc(h), self.raw_scale(h)


class Encoder(nn.Module):
    """Two towers of identical shape: one for the shared z, one for the private w."""

    def __init__(self, z_dim: int, w_dim: int, width: float = 1.0, in_channels: int = 3):
        super().__init__()
        self.tower_w = Tower(w_dim, width, in_channels)
        self.tower_z = Tower(z_dim, width, in_channels)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (z_loc, z_raw_scale, w_loc, w_raw_scale)."""
        z_loc, z_raw = self.tower_z(x)
        w_loc, w_raw = self.tower_w(x)
        return z_loc, z_raw, w_loc, w_raw


class Decoder(nn.Module):
    """concat(w, z) -> image location (no output non-linearity: the likelihood is Laplace on [0, 1])."""

    def __init__(self, z_dim: int, w_dim: int, width: float = 1.0, out_channels: int = 3):
        super().__init__()
        c1, c2, c3 = channels(width)
        self.c3 = c3
        # No activation after the first Linear, as the reference.
        self.fc = nn.Linear(w_dim + z_dim, c3 * BOTTOM * BOTTOM)
        self.body = nn.Sequential(
            ResBlock(c3, c2),
            nn.Upsample(scale_factor=2, mode="nearest"),
            ResBlock(c2, c1),
            nn.Upsample(scale_factor=2, mode="nearest"),
            ResBlock(c1, c1),
        )
        self.out = nn.Conv2d(c1, out_channels, 3, padding=1)

    # Blocks after an upsampling convolve the low-resolution input per output phase (cmvae/upsampled_conv.py):
    # the same values to rounding with ~20% fewer multiply-adds, but slower on the CPU measured (oneDNN runs 2x2
    # kernels poorly: docs/step_cpu.md), so off by default.
    fold_upsampling: bool = False

    def forward(self, wz: torch.Tensor) -> torch.Tensor:
        h = self.fc(wz).view(-1, self.c3, BOTTOM, BOTTOM)
        if not self.fold_upsampling:
            return self.out(_act_(self.body(h)))
        layers = list(self.body)
        i = 0
        while i < len(layers):
            layer = layers[i]
            if isinstance(layer, nn.Upsample) and i + 1 < len(layers) and isinstance(layers[i + 1], ResBlock) \
                    and layer.mode == "nearest" and layer.scale_factor in (2, 2.0):
                h = upsampled_block(layers[i + 1], h, _act)
                i += 2
            else:
                h = layer(h)
                i += 1
        return self.out(_act_(h))


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def macs_per_sample(width: float, z_dim: int = 32, w_dim: int = 32) -> dict[str, int]:
    """Multiply-accumulates of one z tower, one w tower and one decoder for one 28x28 sample.

    Convolutions and linears only. Used for achieved-FLOP/s reports; at width 1.0 with 32-dim latents a
    tower or decoder is ~106.5M MACs.
    """
    c1, c2, c3 = channels(width)

    def conv(cin: int, cout: int, hw: int, k: int = 3) -> int:
        return cin * cout * k * k * hw * hw

    def block(fin: int, fout: int, hw: int) -> int:
        hidden = min(fin, fout)
        short = fin * fout * hw * hw if fin != fout else 0
        return conv(fin, hidden, hw) + conv(hidden, fout, hw) + short

    flat = c3 * BOTTOM * BOTTOM
    body = conv(3, c1, 28) + block(c1, c1, 28) + block(c1, c2, 14) + block(c2, c3, 7)
    decoder = (w_dim + z_dim) * flat + block(c3, c2, 7) + block(c2, c1, 14) + block(c1, c1, 28) + conv(c1, 3, 28)
    return {"tower_z": body + 2 * flat * z_dim, "tower_w": body + 2 * flat * w_dim, "decoder": decoder}
