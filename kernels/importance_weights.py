"""IWAE bound and importance weights from log-weights lw [M, S, B] (S importance samples).

bound[b] = mean_m (logsumexp_s lw[m, s, b] - log S); weights = softmax over s; the DReG path-gradient
factor is the squared normalised weight.
"""

from __future__ import annotations

import math

import torch


def importance_weights_ref(lw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plain-torch reference -> (bound [B], weights [M, S, B], squared weights [M, S, B]).

    Only the bound carries a gradient; the weights are detached, as the estimators use them.
    """
    n_samples = lw.shape[1]
    bound = (torch.logsumexp(lw, dim=1) - math.log(n_samples)).mean(0)
    weights = torch.softmax(lw.detach(), dim=1)
    return bound, weights, weights * weights
