"""Mixture-of-experts posterior density: log q(z|X) = logmeanexp_m' sum_d log q_m'(z_d | loc, scale).

z [M, S, B, D] holds the samples drawn from each source modality's expert; every sample is scored under
all M experts of its datapoint. For DReG the caller passes detached loc/scale.
"""

from __future__ import annotations

import math

import torch

from cmvae.distributions import Family, log_prob


def moe_logq_ref(z: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor, family: Family) -> torch.Tensor:
    """Plain-torch reference. z [M, S, B, D], loc/scale [M', B, D] -> [M, S, B]."""
    n_experts = loc.shape[0]
    # [M, 1, S, B, D] against [1, M', 1, B, D] -> [M, M', S, B]
    lq = log_prob(z[:, None], loc[None, :, None], scale[None, :, None], family).sum(-1)
    return torch.logsumexp(lq, dim=1) - math.log(n_experts)
