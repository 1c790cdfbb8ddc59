"""The conditioning input x_hat of eq. 8: for every datapoint and target modality m, with probability 1/2 the
self-reconstruction (z ~ q_m(z | x_m), w_m ~ q_m(w_m | x_m)), else a cross-reconstruction (n uniform over the M
modalities, z ~ q_n(z | x_n), w_m ~ r_m(w_m), the auxiliary prior that replaces the target's private latent when
it is decoded from another modality). Decoded by the frozen CMVAE's decoder m, its location clamped to [0, 1]
(the image range; the CMVAE's own samples are clamped the same way). A cross draw may pick n = m (uniform over all
M, as eq. 8 writes it); it still uses r_m for w.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cmvae_engine.cmvae.distributions import rsample
from cmvae_engine.cmvae.model import CMVAE


@dataclass
class Conditioning:
    x_hat: torch.Tensor
    """[M, B, C, H, W] in [0, 1]: the reconstruction each target modality's denoiser is conditioned on."""
    cross: torch.Tensor
    """[M, B] bool: a cross-reconstruction (b = 1)."""
    source: torch.Tensor
    """[M, B] long: the modality z came from (m itself for self-reconstructions)."""


@torch.no_grad()
def reconstructions(cmvae: CMVAE, x: torch.Tensor, generator: torch.Generator | None = None,
                    p_cross: float = 0.5) -> Conditioning:
    """x [M, B, C, H, W] float in [0, 1] -> the eq. 8 draws for every target modality (one per datapoint)."""
    n_mod, b = x.shape[:2]
    dev = x.device
    fam = cmvae.config.family
    post = cmvae.encode(x)
    z_all = rsample(post.z_loc, post.z_scale, fam, generator=generator)       # [M, B, Dz], z_n ~ q_n(z | x_n)
    w_self = rsample(post.w_loc, post.w_scale, fam, generator=generator)      # [M, B, Dw], w_m ~ q_m(w_m | x_m)
    aux = cmvae.aux_scale()[:, None, :].expand(-1, b, -1)
    w_aux = rsample(torch.zeros_like(aux), aux, fam, generator=generator)     # [M, B, Dw], w_m ~ r_m
    cross = torch.rand(n_mod, b, device=dev, generator=generator) < p_cross
    drawn = torch.randint(0, n_mod, (n_mod, b), device=dev, generator=generator)
    own = torch.arange(n_mod, device=dev)[:, None].expand(-1, b)
    source = torch.where(cross, drawn, own)
    cols = torch.arange(b, device=dev)[None].expand(n_mod, -1)
    z = z_all[source, cols]                                                   # [M, B, Dz]
    w = torch.where(cross[..., None], w_aux, w_self)
    x_hat = torch.stack([cmvae.decode_pair(m, z[m], w[m]) for m in range(n_mod)]).clamp(0, 1)
    return Conditioning(x_hat, cross, source)
