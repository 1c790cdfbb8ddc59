"""Image log-likelihood summed over pixels: sum_p log F(x_p | pred_p, scale) for a fixed scale.

pred [..., B, C, H, W] holds decoder outputs for R = prod(...) latent draws of each datapoint; target
[B, C, H, W] is broadcast against them, so the targets are never copied R times.
"""

from __future__ import annotations

import torch

from cmvae.distributions import Family, log_prob_const_scale


def image_loglik_ref(pred: torch.Tensor, target: torch.Tensor, scale: float, family: Family) -> torch.Tensor:
    """Plain-torch reference -> [..., B] log-likelihood (positive is better)."""
    return log_prob_const_scale(target.to(pred.dtype), pred, scale, family).flatten(-3).sum(-1)
