"""D-CMVAE samples: a CMVAE sample (unconditional or conditional) as x_hat, then each modality's denoiser.

Unconditional: c ~ Cat(pi) (or a chosen cluster), z ~ p(z | c), w_m ~ p(w_m), the decoders' locations (clamped
to [0, 1]) as x_hat. Conditional: z ~ q_s(z | x_s) of a source modality s, w_m ~ p(w_m). The EMA weights denoise
by default (DiffuseVAE samples with them).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from cmvae_engine.cmvae.diffusion.model import DCMVAE, to_signed, to_unit
from cmvae_engine.cmvae.diffusion.sampling import EpsFn, ddim_sample, ddpm_sample
from cmvae_engine.cmvae.progress import ProgressFn, report

SAMPLERS = ("ddim", "ddpm")


def denoisers(model: DCMVAE, ema: bool = True) -> list[EpsFn]:
    return list(model.ema if ema else model.denoisers)


@torch.no_grad()
def refine(model: DCMVAE, x_hat: torch.Tensor, *, sampler: str = "ddim", steps: int = 50, eta: float = 0.0,
           strength: float = 1.0, generator: torch.Generator | None = None, eps_fns: Sequence[EpsFn] | None = None,
           progress: ProgressFn | None = None) -> torch.Tensor:
    """x_hat [M, B, C, H, W] in [0, 1] -> D-CMVAE samples [M, B, C, H, W] in [0, 1] (modality m by denoiser m).
    `eps_fns`: the denoisers to call (default the EMA ones; the engine passes compiled ones on CUDA); `strength`:
    how far into the forward process the chains start (sampling.py)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"--sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
    fns = list(eps_fns) if eps_fns is not None else denoisers(model)
    out = []
    for m, fn in enumerate(fns):
        xh = to_signed(x_hat[m])
        if sampler == "ddpm":
            x0 = ddpm_sample(fn, model.schedule, xh, generator=generator, strength=strength)
        else:
            x0 = ddim_sample(fn, model.schedule, xh, steps=steps, eta=eta, generator=generator,
                             strength=strength)
        out.append(to_unit(x0))
        report(progress, m + 1, len(fns))
    return torch.stack(out)


@torch.no_grad()
def generate(model: DCMVAE, n: int, cluster: int | None = None, generator: torch.Generator | None = None,
             **kw) -> tuple[torch.Tensor, torch.Tensor]:
    """(CMVAE samples, D-CMVAE samples), each [M, n, C, H, W] in [0, 1]; the second refines the first."""
    x_hat = model.cmvae.generate(n, cluster=cluster, generator=generator)
    return x_hat, refine(model, x_hat, generator=generator, **kw)


@torch.no_grad()
def generate_conditional(model: DCMVAE, x: torch.Tensor, source: int, generator: torch.Generator | None = None,
                         **kw) -> tuple[torch.Tensor, torch.Tensor]:
    """x [B, C, H, W] in [0, 1] of modality `source` -> (CMVAE, D-CMVAE) samples of every modality."""
    x_hat = model.cmvae.generate_conditional(x, source, generator=generator)
    return x_hat, refine(model, x_hat, generator=generator, **kw)
