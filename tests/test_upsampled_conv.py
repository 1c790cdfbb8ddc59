"""A residual block on a nearest-upsampled input, folded into per-phase 2x2 convolutions, equals the block on
the upsampled image (values and gradients), in both memory formats; the decoder gives the same either way."""

import pytest
import torch
import torch.nn.functional as F

from cmvae_engine.cmvae.networks import Decoder, ResBlock, _act
from cmvae_engine.cmvae.upsampled_conv import conv3x3_of_upsampled, upsampled_block


@pytest.mark.parametrize("channels_last", [False, True])
def test_conv_of_upsampled_equals_conv_after_upsampling(channels_last):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 4, 3, dtype=torch.float64, generator=gen)
    w = torch.randn(7, 5, 3, 3, dtype=torch.float64, generator=gen)
    b = torch.randn(7, dtype=torch.float64, generator=gen)
    if channels_last:  # as a channels_last model: weights and activations
        x, w = (t.contiguous(memory_format=torch.channels_last) for t in (x, w))
    ref = F.conv2d(F.interpolate(x, scale_factor=2, mode="nearest"), w, b, padding=1)
    got = conv3x3_of_upsampled(x, w, b)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("fin,fout", [(6, 4), (4, 4)])
def test_upsampled_block_values_and_gradients(fin, fout):
    torch.manual_seed(1)
    block = ResBlock(fin, fout).double()
    x = torch.randn(3, fin, 5, 5, dtype=torch.float64, requires_grad=True)
    up = torch.nn.Upsample(scale_factor=2, mode="nearest")
    g = torch.randn(3, fout, 10, 10, dtype=torch.float64)
    ref = block(up(x))
    ref_grads = torch.autograd.grad(ref, [x, *block.parameters()], g)
    got = upsampled_block(block, x, _act)
    grads = torch.autograd.grad(got, [x, *block.parameters()], g)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)
    for a, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-11)


def test_decoder_same_with_and_without_folding():
    torch.manual_seed(2)
    dec = Decoder(4, 3, width=0.1).double()
    wz = torch.randn(5, 7, dtype=torch.float64)
    outs = []
    for fold in (False, True):
        dec.fold_upsampling = fold
        outs.append(dec(wz))
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=1e-12)
