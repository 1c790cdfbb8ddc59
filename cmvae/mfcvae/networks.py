"""Ladder (VLAE) networks of an MFCVAE: a deterministic backbone in the encoder and in the decoder, each facet
branching off at its own depth (facet 0 the shallowest).

Encoder: x -> block_0 -> h_0 -> block_1 -> h_1 ...; facet j's posterior head reads h_j.
Decoder (the mirror image): the deepest facet's z enters at the top; going down, each shallower facet's rung
(z_j -> width of h_j) is added to the backbone times rung_scale x alpha_j, where alpha_j is the progressive
schedule's weight of facet j (0 while the facet is not yet trained); then two layers to the pixels, sigmoid.
This is the released MNIST architecture (784 -> 500 -> 2000, rungs at 500 and 2000) with our widths.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cmvae_engine.cmvae.mfcvae.config import MFCVAEConfig

MIN_STD = 1e-4
"""Floor of the posterior std (keeps log q finite when a head saturates)."""


class LadderEncoder(nn.Module):
    def __init__(self, cfg: MFCVAEConfig):
        super().__init__()
        n_in = cfg.image_channels * cfg.image_size * cfg.image_size
        widths = [n_in, *cfg.hidden]
        self.blocks = nn.ModuleList(nn.Linear(widths[j], widths[j + 1]) for j in range(cfg.n_facets))
        self.heads = nn.ModuleList(nn.Linear(cfg.hidden[j], 2 * cfg.z_dims[j]) for j in range(cfg.n_facets))

    def forward(self, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """x [B, C, H, W] in [0, 1] -> per facet (mean [B, D_j], std [B, D_j])."""
        h = x.flatten(1)
        out = []
        for block, head in zip(self.blocks, self.heads, strict=True):
            h = F.relu(block(h))
            mu, raw = head(h).chunk(2, dim=-1)
            out.append((mu, F.softplus(raw) + MIN_STD))
        return out


class LadderDecoder(nn.Module):
    def __init__(self, cfg: MFCVAEConfig):
        super().__init__()
        j_top = cfg.n_facets - 1
        self.shape = (cfg.image_channels, cfg.image_size, cfg.image_size)
        self.rung_scale = cfg.rung_scale
        self.top = nn.Linear(cfg.z_dims[j_top], cfg.hidden[j_top])
        # down[j] maps the backbone from facet j+1's width to facet j's; rungs[j] maps z_j to that width
        self.down = nn.ModuleList(nn.Linear(cfg.hidden[j + 1], cfg.hidden[j]) for j in range(j_top))
        self.rungs = nn.ModuleList(nn.Linear(cfg.z_dims[j], cfg.hidden[j]) for j in range(j_top))
        self.mid = nn.Linear(cfg.hidden[0], cfg.hidden[0])
        self.out = nn.Linear(cfg.hidden[0], cfg.image_channels * cfg.image_size * cfg.image_size)

    def forward(self, zs: list[torch.Tensor], alpha: torch.Tensor) -> torch.Tensor:
        """zs: per facet [..., B, D_j]; alpha [J] (the deepest facet's entry is not used: it is the backbone)
        -> pixel means [..., B, C, H, W] in (0, 1)."""
        h = F.relu(self.top(zs[-1]))
        for j in reversed(range(len(self.down))):
            h = F.relu(self.down[j](h)) + (self.rung_scale * alpha[j]) * F.relu(self.rungs[j](zs[j]))
        h = F.relu(self.mid(h))
        return torch.sigmoid(self.out(h)).unflatten(-1, self.shape)
