"""The DDPM forward process q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I) and its Gaussian posterior.

Timesteps are 0-based here: index t in 0..T-1 is the paper's step t + 1. Betas are computed in float64 (the
products of 1000 factors lose digits in float32) and stored as float32 buffers.
"""

from __future__ import annotations

import torch
from torch import nn


def linear_betas(n_steps: int, beta_1: float = 1e-4, beta_T: float = 0.02) -> torch.Tensor:
    """float64 [T], linearly spaced from beta_1 to beta_T (Ho et al.; DiffuseVAE)."""
    if n_steps < 1:
        raise ValueError(f"the diffusion needs at least 1 step, got {n_steps}")
    if not 0 < beta_1 <= beta_T < 1:
        raise ValueError(f"betas must satisfy 0 < beta_1 <= beta_T < 1, got {beta_1}, {beta_T}")
    return torch.linspace(beta_1, beta_T, n_steps, dtype=torch.float64)


class Schedule(nn.Module):
    """Every per-step quantity of the forward process and of its posterior, as [T] float32 buffers."""

    def __init__(self, n_steps: int = 1000, beta_1: float = 1e-4, beta_T: float = 0.02):
        super().__init__()
        betas = linear_betas(n_steps, beta_1, beta_T)
        alphas = 1.0 - betas
        abar = torch.cumprod(alphas, 0)
        abar_prev = torch.cat([abar.new_ones(1), abar[:-1]])
        # posterior q(x_{t-1} | x_t, x_0) = N(c0 x_0 + ct x_t, var); var at t = 0 is 0 (x_0 is known there)
        post_var = betas * (1.0 - abar_prev) / (1.0 - abar)
        tables = {
            "betas": betas, "alphas_bar": abar, "alphas_bar_prev": abar_prev,
            "sqrt_ab": abar.sqrt(), "sqrt_1mab": (1.0 - abar).sqrt(),
            "post_c0": betas * abar_prev.sqrt() / (1.0 - abar),
            "post_ct": (1.0 - abar_prev) * alphas.sqrt() / (1.0 - abar),
            "post_var": post_var,
        }
        for name, value in tables.items():
            self.register_buffer(name, value.float(), persistent=False)
        self.n_steps = n_steps

    @staticmethod
    def _at(table: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """table[t] shaped [B, 1, 1, 1] to broadcast over images."""
        return table[t].view(-1, 1, 1, 1)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps."""
        return self._at(self.sqrt_ab, t) * x0 + self._at(self.sqrt_1mab, t) * noise

    def predict_x0(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        return (x_t - self._at(self.sqrt_1mab, t) * eps) / self._at(self.sqrt_ab, t)

    def posterior(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, variance [B, 1, 1, 1]) of q(x_{t-1} | x_t, x_0)."""
        return self._at(self.post_c0, t) * x0 + self._at(self.post_ct, t) * x_t, self._at(self.post_var, t)
