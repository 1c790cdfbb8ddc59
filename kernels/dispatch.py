"""Backend choice for the ops: chosen once, overridable for tests and benchmarks.

`CMVAE_KERNELS` (environment) or `set_backend()` select `auto` or `torch`.
"""

from __future__ import annotations

import os

import torch

from cmvae.distributions import Family
from kernels.image_nll import image_loglik_ref
from kernels.importance_weights import importance_weights_ref
from kernels.mixture_logpdf import mixture_logpdf_ref
from kernels.moe_logq import moe_logq_ref

BACKENDS = ("auto", "torch")
_backend = os.environ.get("CMVAE_KERNELS", "auto")


def set_backend(name: str) -> None:
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}; expected one of {BACKENDS}")
    _backend = name


def get_backend() -> str:
    return _backend


def mixture_logpdf(
    z: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor, log_pi: torch.Tensor, family: Family,
    with_posterior: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    return mixture_logpdf_ref(z, loc, scale, log_pi, family, with_posterior)


def moe_logq(z: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor, family: Family) -> torch.Tensor:
    return moe_logq_ref(z, loc, scale, family)


def importance_weights(lw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return importance_weights_ref(lw)


def image_loglik(pred: torch.Tensor, target: torch.Tensor, scale: float, family: Family) -> torch.Tensor:
    return image_loglik_ref(pred, target, scale, family)
