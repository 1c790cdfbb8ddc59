"""Mixture-prior log-density: log p(z) = logsumexp_c (log pi_c + sum_d log F(z_d | mu_cd, s_cd)).

By the identity sum_c p(c|z)(log pi_c + log p(z|c) - log p(c|z)) = log p(z) (value and gradient), this
one logsumexp is the whole cluster term of the CMVAE objective. Optionally also returns the
responsibilities p(c|z) and their entropy in nats (callers normalise it by log K as they need).
Pruned clusters carry log_pi = -inf and get exactly zero responsibility.
"""

from __future__ import annotations

import torch

from cmvae.distributions import Family, log_prob


def component_logpdf_ref(
    z: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor, log_pi: torch.Tensor, family: Family
) -> torch.Tensor:
    """[N, K] joint log-densities log pi_c + log p(z | c)."""
    lp = log_prob(z[:, None, :], loc[None], scale[None], family).sum(-1)
    return lp + log_pi[None]


def mixture_logpdf_ref(
    z: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor, log_pi: torch.Tensor, family: Family,
    with_posterior: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Plain-torch reference. z [N, D], loc/scale [K, D], log_pi [K] -> (log p(z) [N], resp [N, K], entropy [N])."""
    joint = component_logpdf_ref(z, loc, scale, log_pi, family)
    logp = torch.logsumexp(joint, dim=-1)
    if not with_posterior:
        return logp, None, None
    log_resp = joint - logp[:, None]
    resp = log_resp.exp()
    # 0 * log 0 = 0 for pruned clusters: mask instead of multiplying -inf by 0.
    entropy = -torch.where(resp > 0, resp * log_resp, torch.zeros_like(resp)).sum(-1)
    return logp, resp, entropy
