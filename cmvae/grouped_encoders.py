"""All 2M encoder towers (M modalities x {z, w}) as one grouped computation.

The towers have identical bodies, so tower g = (m, t) (t = 0 for z, 1 for w) becomes group g of grouped
convolutions whose weights are the towers' own weights concatenated along the output channels, each step (the
parameters, hence state_dict and checkpoints, stay those of the per-tower modules; the concatenation's backward
hands every tower its own gradient slice). The first convolution reads modality m's image once for both of its
towers (groups = M, 2 c1 outputs per group); later layers use groups = 2M; the heads are one batched matmul per
latent (z, w) over modalities. Activations keep the [B, 2M x C, H, W] layout throughout, so nothing is
transposed between layers. Values equal the per-tower path's to rounding (same sums, other blocking).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cmvae_engine.cmvae.networks import Encoder, ResBlock, Tower, _act, _act_


def _cat(tensors: list[torch.Tensor | None]) -> torch.Tensor | None:
    return None if tensors[0] is None else torch.cat(tensors)  # type: ignore[arg-type]


def _grouped_block(blocks: list[ResBlock], h: torch.Tensor) -> torch.Tensor:
    groups = len(blocks)
    w0, b0 = _cat([b.conv0.weight for b in blocks]), _cat([b.conv0.bias for b in blocks])
    w1, b1 = _cat([b.conv1.weight for b in blocks]), _cat([b.conv1.bias for b in blocks])
    skip = h if blocks[0].shortcut is None else F.conv2d(h, _cat([b.shortcut.weight for b in blocks]), groups=groups)
    inner = F.conv2d(_act(h), w0, b0, padding=1, groups=groups)
    return skip + 0.1 * F.conv2d(_act_(inner), w1, b1, padding=1, groups=groups)


def _grouped_heads(towers: list[Tower], h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """h [M, B, F] -> (loc, raw) [M, B, D], both heads of every tower in one batched matmul."""
    d = towers[0].loc.out_features
    weight = torch.stack([torch.cat([t.loc.weight, t.raw_scale.weight]) for t in towers])   # [M, 2D, F]
    bias = torch.stack([torch.cat([t.loc.bias, t.raw_scale.bias]) for t in towers])         # [M, 2D]
    out = torch.baddbmm(bias[:, None, :], h, weight.transpose(1, 2))                        # [M, B, 2D]
    return out[..., :d], out[..., d:]


class GroupedEncoders(nn.Module):
    """Runs a list of `Encoder`s on x [M, B, C, H, W] as one grouped computation; holds no parameters itself.

    It is kept out of the model's module tree (the caller stores it outside `_modules`), so it adds no
    state_dict keys; the engine may wrap its `forward` (autocast, profiler ranges) like any network's.
    """

    def __init__(self, encoders: nn.ModuleList):
        super().__init__()
        # A plain list, not a submodule: the parameters belong to (and are saved with) the encoders.
        self.__dict__["_encoders"] = encoders

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [M, B, C, H, W] -> (z_loc, z_raw, w_loc, w_raw), each [M, B, D]."""
        encs: list[Encoder] = list(self._encoders)
        n_mod, batch = x.shape[0], x.shape[1]
        towers = [t for e in encs for t in (e.tower_z, e.tower_w)]
        bodies = [t.body for t in towers]
        first = [b[0] for b in bodies]
        h = x.transpose(0, 1).reshape(batch, n_mod * x.shape[2], *x.shape[3:])
        if first[0].weight.is_contiguous(memory_format=torch.channels_last) and not first[0].weight.is_contiguous():
            h = h.contiguous(memory_format=torch.channels_last)
        h = F.conv2d(h, _cat([c.weight for c in first]), _cat([c.bias for c in first]), padding=1, groups=n_mod)
        for i in range(1, len(bodies[0])):
            layer = bodies[0][i]
            if isinstance(layer, ResBlock):
                h = _grouped_block([b[i] for b in bodies], h)
            elif isinstance(layer, nn.AvgPool2d):
                h = layer(h)
            elif isinstance(layer, nn.Flatten):
                h = h.reshape(batch, n_mod, 2, -1)
            else:
                raise TypeError(f"GroupedEncoders: no grouped form for the tower layer {type(layer).__name__}")
        z_loc, z_raw = _grouped_heads([e.tower_z for e in encs], h[:, :, 0].transpose(0, 1))
        w_loc, w_raw = _grouped_heads([e.tower_w for e in encs], h[:, :, 1].transpose(0, 1))
        return z_loc, z_raw, w_loc, w_raw
