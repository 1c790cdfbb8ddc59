"""Reverse processes: DDPM ancestral sampling and DDIM (Song et al.) on a subsequence of the T steps.

`eps_fn(x_t, t, x_hat)` is a denoiser (t [B] long). The predicted x_0 is clamped to [-1, 1] at every step (the
data range; DiffuseVAE does the same) and, for DDIM, the noise is recomputed from the clamped x_0 so that both
stay consistent. DDIM's eta scales its per-step noise: eta = 0 is deterministic given x_T; eta = 1 on all T steps
has the variance of DDPM's posterior q(x_{t-1} | x_t, x_0) (beta-tilde).

`strength` in (0, 1] is how much of the forward process the reverse one walks back. 1 (the default) starts from
pure noise x_T ~ N(0, I), as DiffuseVAE. Below 1 the chain starts at t_0 = start_step(strength, T) from
q(x_{t_0} | x_hat), the CMVAE sample noised to that level, and runs the steps t_0 .. 0 only: the denoiser then
redraws the detail and keeps the coarse layout of x_hat (its digit), trading sharpness against fidelity to x_hat.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from cmvae_engine.cmvae.diffusion.schedule import Schedule
from cmvae_engine.cmvae.progress import ProgressFn, report

EpsFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def ddim_timesteps(n_steps: int, total: int) -> list[int]:
    """n_steps uniformly spaced 0-based timesteps, descending, ending at 0 and starting near total - 1."""
    if not 1 <= n_steps <= total:
        raise ValueError(f"--steps must be in 1..{total} (the diffusion's T), got {n_steps}")
    stride = total / n_steps
    return sorted({int(round(i * stride)) for i in range(n_steps)}, reverse=True)


def start_step(strength: float, total: int) -> int:
    """The 0-based timestep a chain of `strength` starts at: total - 1 for 1, fewer steps for less."""
    if not 0 < strength <= 1:
        raise ValueError(f"--strength must be in (0, 1], got {strength}")
    return max(0, min(total - 1, round(strength * total) - 1))


def start_point(schedule: Schedule, x_hat: torch.Tensor, strength: float, t_first: int,
                x_T: torch.Tensor | None, generator: torch.Generator | None, temperature: float) -> torch.Tensor:
    """x at the chain's first timestep t_first: pure noise for strength 1, else x_hat noised by the forward process
    to t_first. `x_T` (a given noise) replaces the drawn one in both cases."""
    noise = (x_T if x_T is not None else
             torch.randn(x_hat.shape, device=x_hat.device, generator=generator)) * temperature
    if strength == 1:
        return noise
    tt = torch.full((x_hat.shape[0],), t_first, device=x_hat.device, dtype=torch.long)
    return schedule.q_sample(x_hat, tt, noise)


def ddim_sigma(schedule: Schedule, t: int, t_prev: int | None, eta: float) -> float:
    """sigma of the DDIM step t -> t_prev (None: the final step to x_0)."""
    ab = float(schedule.alphas_bar[t])
    ab_prev = 1.0 if t_prev is None else float(schedule.alphas_bar[t_prev])
    return eta * ((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)) ** 0.5


@torch.no_grad()
def ddpm_sample(eps_fn: EpsFn, schedule: Schedule, x_hat: torch.Tensor, x_T: torch.Tensor | None = None,
                generator: torch.Generator | None = None, temperature: float = 1.0,
                progress: ProgressFn | None = None, strength: float = 1.0) -> torch.Tensor:
    """Ancestral sampling over the T steps (or, with strength < 1, the steps t_0 .. 0) with variance beta_t
    (DDPM's choice, as DiffuseVAE); x_hat [B, C, H, W] in [-1, 1]; returns x_0 in [-1, 1]."""
    t0 = start_step(strength, schedule.n_steps)
    x = start_point(schedule, x_hat, strength, t0, x_T, generator, temperature)
    n = t0 + 1
    for i, t in enumerate(range(t0, -1, -1)):
        tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        eps = eps_fn(x, tt, x_hat).float()
        x0 = schedule.predict_x0(x, tt, eps).clamp(-1, 1)
        mean, _ = schedule.posterior(x0, x, tt)
        if t > 0:
            noise = torch.randn(x.shape, device=x.device, generator=generator)
            x = mean + schedule.betas[t].sqrt() * noise
        else:
            x = mean
        report(progress, i + 1, n)
    return x


@torch.no_grad()
def ddim_sample(eps_fn: EpsFn, schedule: Schedule, x_hat: torch.Tensor, steps: int = 50, eta: float = 0.0,
                x_T: torch.Tensor | None = None, generator: torch.Generator | None = None,
                temperature: float = 1.0, progress: ProgressFn | None = None,
                strength: float = 1.0) -> torch.Tensor:
    """DDIM over `steps` uniformly spaced timesteps of 0 .. t_0 (t_0 = T - 1 at strength 1; at most t_0 + 1
    steps; x_hat noised to the first of them); returns x_0 in [-1, 1]."""
    span = start_step(strength, schedule.n_steps) + 1
    seq = ddim_timesteps(min(steps, span), span)
    x = start_point(schedule, x_hat, strength, seq[0], x_T, generator, temperature)
    for i, t in enumerate(seq):
        t_prev = seq[i + 1] if i + 1 < len(seq) else None
        tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        eps = eps_fn(x, tt, x_hat).float()
        ab = schedule.alphas_bar[t]
        x0 = schedule.predict_x0(x, tt, eps).clamp(-1, 1)
        eps = (x - ab.sqrt() * x0) / (1 - ab).sqrt()
        if t_prev is None:
            x = x0
        else:
            ab_prev = schedule.alphas_bar[t_prev]
            sigma = ddim_sigma(schedule, t, t_prev, eta)
            x = ab_prev.sqrt() * x0 + (1 - ab_prev - sigma ** 2).clamp(min=0).sqrt() * eps
            if sigma > 0:
                x = x + sigma * torch.randn(x.shape, device=x.device, generator=generator)
        report(progress, i + 1, len(seq))
    return x
