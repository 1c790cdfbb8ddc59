"""The MFCVAE model and its objective (seed 003, eq. 14, one Monte Carlo sample).

p(x, z, c) = p(x | z_1..z_J) prod_j p(z_j | c_j) p(c_j); q(z_j | x) diagonal Gaussian per facet; q(c_j | x) is
not a network but the optimum of Theorem 2 / eq. 12, pi_j(c | x) ~ exp(E_q log p(c | z_j)), estimated (as the
released code does) with the one sample of z_j: q(c_j | x) = p(c_j | z_j). With that q(c_j | x), facet j's
terms of eq. 14,

    E_q(c_j|x) [log q(z_j|x) - log p(z_j|c_j)] + KL(q(c_j|x) || p(c_j))    (KL_z by Monte Carlo at the sample),

sum to log q(z_j|x) - log p(z_j), value and gradient (sum_c p(c|z) (log pi_c + log p(z|c) - log p(c|z)) =
log p(z)): one mixture log-density per facet, which the fused op computes for all facets at once. The released
code also clamps q at 1e-6 inside KL_c; we do not (it changes the bound by less than K x 1e-6 nats).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from cmvae_engine.cmvae.mfcvae.config import MFCVAEConfig
from cmvae_engine.cmvae.mfcvae.networks import LadderDecoder, LadderEncoder
from cmvae_engine.cmvae.mfcvae.priors import FacetPriors, facet_log_densities, q_c_exact
from cmvae_engine.kernels import image_loglik

_HALF_LOG_2PI = 0.9189385332046727


@dataclass
class MFCVAEOutput:
    bound: torch.Tensor
    """[B] the ELBO of each datapoint (one sample, unweighted)."""
    loss: torch.Tensor
    """0-d: minus the progressive-weighted bound, summed over the batch."""
    rec: torch.Tensor
    """[B] log p(x | z)."""
    kl: list[torch.Tensor]
    """Per facet [B]: log q(z_j|x) - log p(z_j), facet j's terms of eq. 14."""


def _fp32(t: torch.Tensor) -> torch.Tensor:
    """Autocast networks hand back bf16/fp16: the probabilistic core runs in fp32 (fp64 stays fp64)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


class MFCVAE(nn.Module):
    def __init__(self, cfg: MFCVAEConfig):
        super().__init__()
        self.config = cfg
        self.encoder = LadderEncoder(cfg)
        self.decoder = LadderDecoder(cfg)
        self.priors = FacetPriors(cfg)

    @property
    def n_facets(self) -> int:
        return self.config.n_facets

    def posterior(self, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per facet (mean, std) of q(z_j | x); x float in [0, 1], [B, C, H, W]."""
        return [(_fp32(m), _fp32(s)) for m, s in self.encoder(x)]

    def assign(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Per facet q(c_j | x) [B, K_j] of eq. 12 in closed form (the assignment is its argmax)."""
        return [q_c_exact(m, s, self.priors, j) for j, (m, s) in enumerate(self.posterior(x))]

    def decode(self, zs: list[torch.Tensor], alpha: torch.Tensor | None = None) -> torch.Tensor:
        if alpha is None:
            alpha = torch.ones(self.n_facets, device=zs[0].device)
        return self.decoder(zs, alpha)

    def forward(self, x: torch.Tensor, alpha: torch.Tensor, kl_weight: torch.Tensor,
                generator: torch.Generator | None = None, packed: bool = True) -> MFCVAEOutput:
        """The one-sample bound of eq. 14 at x [B, C, H, W] in [0, 1]; alpha [J] scales the decoder rungs and
        kl_weight [J] the facets' KL terms in the loss (the progressive schedule; ones: the plain objective)."""
        post = self.posterior(x)
        zs, log_q = [], []
        for mean, std in post:
            eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
            zs.append(mean + std * eps)
            log_q.append((-std.log() - _HALF_LOG_2PI - 0.5 * eps.pow(2)).sum(-1))  # log N(z; mean, std) at z
        log_p, _ = facet_log_densities(zs, self.priors, packed=packed)
        pred = _fp32(self.decode(zs, alpha))
        rec = image_loglik(pred, x, self.config.likelihood_scale, "normal")
        kl = [lq - lp for lq, lp in zip(log_q, log_p, strict=True)]
        bound = rec - torch.stack(kl).sum(0)
        weighted = rec - sum(kl_weight[j] * kl[j] for j in range(self.n_facets))
        return MFCVAEOutput(bound=bound, loss=-weighted.sum(), rec=rec, kl=kl)

    @torch.no_grad()
    def generate(self, facet: int, cluster: int, n: int, generator: torch.Generator | None = None,
                 others: list[torch.Tensor] | None = None) -> torch.Tensor:
        """n images with z_facet drawn from cluster `cluster` of its prior; the other facets' z from `others`
        (per facet [n, D]) or, when None, from their priors' mixtures. -> [n, C, H, W]."""
        device = self.priors.loc[0].device
        zs = []
        for j in range(self.n_facets):
            loc, std, log_pi = self.priors.params(j)
            if j == facet:
                c = torch.full((n,), cluster, device=device, dtype=torch.long)
            elif others is not None:
                zs.append(others[j].to(device))
                continue
            else:
                c = torch.multinomial(log_pi.exp(), n, replacement=True, generator=generator)
            eps = torch.randn((n, loc.shape[1]), generator=generator, device=device)
            zs.append(loc[c] + std[c] * eps)
        return self.decode(zs)
