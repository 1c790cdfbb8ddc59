"""Element-wise Laplace and Normal log-densities: the formulas every fused op evaluates.

They live with the ops (the lowest floor) so that the op files can state their reference math without
importing the model; `cmvae.distributions` builds the samplers and scale rules on top of them.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

Family = Literal["laplace", "normal"]
FAMILIES: tuple[str, ...] = ("laplace", "normal")

LOG_2 = math.log(2.0)
HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


def check_family(family: str) -> Family:
    if family not in FAMILIES:
        raise ValueError(f"unknown distribution family {family!r}; expected one of {FAMILIES}")
    return family  # type: ignore[return-value]


def log_prob(x: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor, family: Family) -> torch.Tensor:
    """Element-wise log-density (no reduction)."""
    if family == "laplace":
        return -torch.log(2.0 * scale) - (x - loc).abs() / scale
    return -torch.log(scale) - HALF_LOG_2PI - 0.5 * ((x - loc) / scale) ** 2


def log_prob_const_scale(x: torch.Tensor, loc: torch.Tensor, scale: float, family: Family) -> torch.Tensor:
    """Element-wise log-density for a Python-float scale (image likelihoods, fixed priors)."""
    if family == "laplace":
        return -(x - loc).abs() / scale - math.log(2.0 * scale)
    return -0.5 * ((x - loc) / scale) ** 2 - math.log(scale) - HALF_LOG_2PI
