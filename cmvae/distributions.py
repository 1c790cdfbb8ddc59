"""Laplace and Normal densities, samplers and the reference scale parameterisation.

Plain functions on tensors: the training path never builds `torch.distributions` objects, whose
per-call argument validation costs kernels and host syncs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cmvae_engine.kernels.densities import (  # noqa: F401  (re-exported: the model's one import for densities)
    FAMILIES,
    LOG_2,
    Family,
    check_family,
    log_prob,
    log_prob_const_scale,
)

# Added to every scale as the reference does, so that a softmax underflow never gives a zero scale.
SCALE_EPS = 1e-20


def scale_from_raw(raw: torch.Tensor, family: Family) -> torch.Tensor:
    """Map an unconstrained tensor to a positive scale as the reference does.

    Laplace: softmax over the last dim times its size, so the scales of one block sum to D (a block of
    zeros gives scale 1 everywhere). Normal: softplus.
    """
    if family == "laplace":
        return F.softmax(raw, dim=-1) * raw.shape[-1] + SCALE_EPS
    return F.softplus(raw) + SCALE_EPS


def rsample(
    loc: torch.Tensor, scale: torch.Tensor, family: Family, sample_shape: tuple[int, ...] = (),
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Reparameterised sample of shape sample_shape + loc.shape.

    Laplace uses the inverse CDF on u ~ U(-1, 1): x = loc - scale * sign(u) * log(1 - |u|), with u kept
    strictly inside the interval so that the log never sees 0.
    """
    shape = tuple(sample_shape) + tuple(loc.shape)
    if family == "laplace":
        finfo = torch.finfo(loc.dtype)
        u = torch.rand(shape, dtype=loc.dtype, device=loc.device, generator=generator)
        u = (u * 2.0 - 1.0).clamp(min=-1.0 + finfo.eps, max=1.0 - finfo.eps)
        return loc - scale * torch.sign(u) * torch.log1p(-u.abs())
    eps = torch.randn(shape, dtype=loc.dtype, device=loc.device, generator=generator)
    return loc + scale * eps


def fixed_scale(family: Family, dim: int) -> float:
    """The fixed prior scale of the reference: Laplace softmax(0)*D = 1, Normal softplus(0) = log 2."""
    del dim  # the Laplace rule gives 1 whatever the dimension
    return 1.0 if family == "laplace" else LOG_2
