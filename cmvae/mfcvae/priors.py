"""The facets' mixture-of-Gaussians priors p(z_j | c_j) p(c_j), their log-densities through the fused
`mixture_logpdf` op (all facets in one call), and q(c_j | x) of Theorem 2 / eq. 12.

One op call for all facets: the facets' rows are stacked, their latents padded to the largest D with zeros,
and one extra coordinate holds the facet's index times GAP; facet i's clusters sit at i x GAP in that coordinate
(std 1) and at 0 (std 1) in the padded ones. A row of facet j is then GAP^2 / 2 = 5e7 nats away from every
cluster of another facet, so those clusters get responsibility exactly 0 (exp underflows) and no gradient, and
the padded and extra coordinates add the constant (pad + 1) x log N(0; 0, 1) to its log-density, which is taken
off. The result equals J separate calls, value and gradient (tests/test_mfcvae_model.py).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from cmvae_engine.cmvae.mfcvae.config import MFCVAEConfig
from cmvae_engine.kernels import mixture_logpdf

GAP = 1.0e4
_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)
_SOFTPLUS_BETA = 10.0


def _inverse_softplus(v: float, beta: float = _SOFTPLUS_BETA) -> float:
    return math.log(math.expm1(beta * v)) / beta


class FacetPriors(nn.Module):
    """Per facet j: cluster means loc_j [K_j, D_j], variances softplus_10(raw_var_j) [K_j, D_j] (diagonal) and
    weight logits pi_logits_j [K_j] (uniform at the start)."""

    def __init__(self, cfg: MFCVAEConfig):
        super().__init__()
        raw = _inverse_softplus(cfg.prior_var_init)
        self.loc = nn.ParameterList(nn.Parameter(torch.randn(k, d)) for k, d in zip(cfg.n_clusters, cfg.z_dims,
                                                                                   strict=True))
        self.raw_var = nn.ParameterList(nn.Parameter(torch.full((k, d), raw)) for k, d in zip(cfg.n_clusters,
                                                                                             cfg.z_dims, strict=True))
        self.pi_logits = nn.ParameterList(nn.Parameter(torch.zeros(k), requires_grad=cfg.learn_pi)
                                          for k in cfg.n_clusters)

    def params(self, j: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loc [K, D], std [K, D], log pi [K]) of facet j."""
        var = F.softplus(self.raw_var[j], beta=_SOFTPLUS_BETA)
        return self.loc[j], var.sqrt(), torch.log_softmax(self.pi_logits[j], dim=0)

    @property
    def n_facets(self) -> int:
        return len(self.loc)


def facet_log_densities(zs: list[torch.Tensor], priors: FacetPriors, *, with_posterior: bool = False,
                        packed: bool = True) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
    """log p(z_j) [B] of each facet's mixture prior at its sample zs[j] [B, D_j], and on request p(c_j | z_j)
    [B, K_j]; `packed`: all facets in one fused call (see the module docstring), else one call per facet."""
    if not packed or len(zs) == 1:
        out = [mixture_logpdf(z, *priors.params(j), "normal", with_posterior) for j, z in enumerate(zs)]
        return [o[0] for o in out], ([o[1] for o in out] if with_posterior else None)
    d_max = max(z.shape[-1] for z in zs)
    rows, locs, stds, log_pis = [], [], [], []
    for j, z in enumerate(zs):
        loc, std, log_pi = priors.params(j)
        pad = d_max - z.shape[-1]
        tag = torch.full((*z.shape[:-1], 1), j * GAP, dtype=z.dtype, device=z.device)
        rows.append(torch.cat([F.pad(z, (0, pad)), tag], dim=-1))
        locs.append(torch.cat([F.pad(loc, (0, pad)), torch.full_like(loc[:, :1], j * GAP)], dim=-1))
        stds.append(torch.cat([F.pad(std, (0, pad), value=1.0), torch.ones_like(std[:, :1])], dim=-1))
        log_pis.append(log_pi)
    logp, resp, _ = mixture_logpdf(torch.cat(rows), torch.cat(locs), torch.cat(stds), torch.cat(log_pis),
                                   "normal", with_posterior)
    b = zs[0].shape[0]
    logps, resps, k0 = [], [], 0
    for j, z in enumerate(zs):
        const = (d_max - z.shape[-1] + 1) * _HALF_LOG_2PI  # the padded and tag coordinates' log N(0; 0, 1)
        logps.append(logp[j * b:(j + 1) * b] + const)
        k = priors.loc[j].shape[0]
        if with_posterior:
            resps.append(resp[j * b:(j + 1) * b, k0:k0 + k])
        k0 += k
    return logps, (resps if with_posterior else None)


def q_c_estimate(z_samples: torch.Tensor, priors: FacetPriors, j: int) -> torch.Tensor:
    """Eq. 12 estimated with S samples of z_j ~ q(z_j | x): q(c | x) = softmax_c(mean_s log p(c | z_s)),
    z_samples [S, B, D] -> [B, K]. With S = 1 it is p(c | z), what training uses (the responsibilities of the
    fused op)."""
    s, b, d = z_samples.shape
    _, resp, _ = mixture_logpdf(z_samples.reshape(s * b, d), *priors.params(j), "normal", True)
    log_resp = resp.clamp_min(torch.finfo(resp.dtype).tiny).log().view(s, b, -1)
    return torch.softmax(log_resp.mean(0), dim=-1)


def q_c_exact(mean: torch.Tensor, std: torch.Tensor, priors: FacetPriors, j: int) -> torch.Tensor:
    """Eq. 12 in closed form for Gaussians: E_q log p(c | z) = log pi_c + E_q log N(z; mu_c, s_c) - E_q log p(z),
    and the last term does not depend on c, so q(c | x) = softmax_c(log pi_c - sum_d [log s_cd + log(2 pi) / 2 +
    ((m_d - mu_cd)^2 + v_d) / (2 s_cd^2)]) for q(z | x) = N(m, diag v). [B, K]; the assignment is its argmax."""
    loc, s, log_pi = priors.params(j)
    var = std.pow(2)[:, None, :]
    e_log = -(s.log()[None] + _HALF_LOG_2PI + ((mean[:, None, :] - loc[None]).pow(2) + var) / (2 * s.pow(2)[None]))
    return torch.softmax(log_pi[None] + e_log.sum(-1), dim=-1)
