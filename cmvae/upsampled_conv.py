"""A residual block applied to a 2x nearest-upsampled input, computed without convolving repeated pixels.

Nearest upsampling repeats every pixel 2x2, so a 3x3 convolution (padding 1) of the upsampled image is, for each
of the four output phases (a, b) = (row mod 2, column mod 2), a 2x2 convolution of the low-resolution image whose
taps are sums of the 3x3 taps: along each axis, phase 0 reads offsets (-1, 0) with taps (w[0], w[1] + w[2]) and
phase 1 reads offsets (0, +1) with taps (w[0] + w[1], w[2]). The four phases cost 16 instead of 36 multiply-adds
per output pixel and input/output channel pair; the zero padding of the upsampled image is the zero padding of
the low-resolution one. The block's activation (elementwise) and 1x1 shortcut commute with the upsampling, so
they run at low resolution too. Same values as block(upsample(x)) to rounding; gradients by autograd.

In the PolyMNIST decoder this removes ~24% of the decoder's multiply-adds (the first convolution and the shortcut
of the two blocks after an upsampling).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

# _TAPS[a][i, k]: weight of 3x3 tap k in tap i of phase a's 2x2 kernel (one axis).
_TAPS = (((1.0, 0.0, 0.0), (0.0, 1.0, 1.0)),
         ((1.0, 1.0, 0.0), (0.0, 0.0, 1.0)))


def phase_weights(weight: torch.Tensor) -> torch.Tensor:
    """[O, C, 3, 3] -> [2, 2, O, C, 2, 2]: the 2x2 kernel of every output phase (a, b)."""
    taps = torch.tensor(_TAPS, dtype=weight.dtype, device=weight.device)  # [2(a), 2(i), 3(k)]
    return torch.einsum("aik,ockl,bjl->abocij", taps, weight, taps)


def _interleave(phases: list[list[torch.Tensor]]) -> torch.Tensor:
    """phases[a][b] [N, O, H, W] -> [N, O, 2H, 2W] with out[..., 2h + a, 2w + b] = phases[a][b][..., h, w], in
    the memory format of the inputs."""
    n, o, h, w = phases[0][0].shape
    if phases[0][0].is_contiguous(memory_format=torch.channels_last) and not phases[0][0].is_contiguous():
        nhwc = [[p.permute(0, 2, 3, 1) for p in row] for row in phases]              # views [N, H, W, O]
        rows = [torch.stack(row, dim=3) for row in nhwc]                              # [N, H, W, 2(b), O]
        out = torch.stack(rows, dim=2).reshape(n, 2 * h, 2 * w, o)                    # [N, H, 2(a), W, 2(b), O]
        return out.permute(0, 3, 1, 2)                                                # channels_last
    rows = [torch.stack(row, dim=-1) for row in phases]                               # [N, O, H, W, 2(b)]
    return torch.stack(rows, dim=-3).reshape(n, o, 2 * h, 2 * w)                      # [N, O, H, 2(a), W, 2(b)]


def conv3x3_of_upsampled(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """conv2d(upsample_nearest_2x(x), weight [O, C, 3, 3], bias, padding=1) as 2x2 convolutions of x.

    One convolution computes all four phases' kernels (4 O output channels) over the (H+1) x (W+1) positions of
    x padded by one; phase (a, b) is the window starting at (a, b). A single large call runs faster here than four
    exact-size ones; the border row and column it computes in excess cost (H+1)(W+1)/HW - 1 (15% at 14 x 14).
    """
    o = weight.shape[0]
    h, w = x.shape[-2:]
    kernels = phase_weights(weight).reshape(4 * o, weight.shape[1], 2, 2)
    both = F.conv2d(x, kernels, None if bias is None else bias.repeat(4), padding=1)  # [N, 4 O, H+1, W+1]
    phases = [[both[:, (2 * a + b) * o:(2 * a + b + 1) * o, a:a + h, b:b + w] for b in (0, 1)] for a in (0, 1)]
    return _interleave(phases)


def upsample2(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=2, mode="nearest")


def upsampled_block(block: nn.Module, x: torch.Tensor, act: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """block(upsample_nearest_2x(x)) for a networks.ResBlock (skip + 0.1 conv1(act(conv0(act(.))))) with the
    upsampling moved past everything that commutes with it (`act` is elementwise)."""
    skip = upsample2(x if block.shortcut is None else block.shortcut(x))
    inner = conv3x3_of_upsampled(act(x), block.conv0.weight, block.conv0.bias)
    return skip + 0.1 * block.conv1(act(inner))  # (inner is fresh: an in-place act would do as well)
