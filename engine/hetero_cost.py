"""Network work of a heterogeneous model (images of any size, captions): multiply-accumulates counted with forward
hooks on one datapoint, for the FLOP/s figures of benchmarks. Convolutions, transposed convolutions and linear layers;
the caption embedding is a lookup (no MACs)."""

from __future__ import annotations

import torch
from torch import nn


def _macs(module: nn.Module, x: torch.Tensor) -> int:
    total = 0

    def hook(mod: nn.Module, args: tuple, out: torch.Tensor) -> None:
        nonlocal total
        if isinstance(mod, nn.ConvTranspose2d):
            kh, kw = mod.kernel_size
            total += args[0].numel() * mod.out_channels * kh * kw
        elif isinstance(mod, nn.Conv2d):
            kh, kw = mod.kernel_size
            total += out.numel() * (mod.in_channels // mod.groups) * kh * kw
        elif isinstance(mod, nn.Linear):
            total += out.numel() * mod.in_features

    handles = [m.register_forward_hook(hook) for m in module.modules()
               if isinstance(m, nn.Conv2d | nn.ConvTranspose2d | nn.Linear)]
    was = module.training
    try:
        module.eval()
        with torch.no_grad():
            module(x)
    finally:
        module.train(was)
        for h in handles:
            h.remove()
    return total


def hetero_step_flops(model_cfg, batch: int, n_samples: int) -> float:
    """FLOPs of one training step (2 per MAC, forward + backward ~ 3x forward): every encoder on its modality, every
    decoder on every source's S x B latents."""
    from cmvae_engine.cmvae.hetero import HeteroCMVAE

    model = HeteroCMVAE(model_cfg)  # the caption embedding's Linear is never called (a lookup): no MACs counted
    enc_macs = dec_macs = 0
    for spec, enc, dec in zip(model_cfg.modalities, model.encoders, model.decoders, strict=True):
        x = (torch.zeros(1, spec["length"], dtype=torch.long) if spec["kind"] == "text"
             else torch.zeros(1, spec["channels"], spec["size"], spec["size"]))
        enc_macs += _macs(enc, x)
        dec_macs += _macs(dec, torch.zeros(1, model_cfg.w_dim + model_cfg.z_dim))
    m = model_cfg.n_modalities
    return 3.0 * 2.0 * (batch * enc_macs + batch * n_samples * m * dec_macs)
