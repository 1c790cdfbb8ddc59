"""Backend choice for the ops: chosen once, overridable for tests and benchmarks.

Backends: `torch` (the plain-torch references, differentiable by autograd), `triton` (fused Triton kernels;
CUDA tensors, or CPU tensors when TRITON_INTERPRET=1 was set before `kernels` was imported), `ext` (the C++/CUDA
extension) and `auto`: triton for CUDA tensors when Triton is installed, the extension for CPU tensors when it
is built, otherwise torch. The request comes from `set_backend()` (the trainer applies `--kernels`), else from
the environment variable CMVAE_KERNELS, else `auto`. Which backend serves each device type is decided when the
request is made (at import and in `set_backend`), logged once, and only looked up per call, so that
`torch.compile(fullgraph=True)` traces straight to the op.
"""

from __future__ import annotations

import logging
import os

import torch

from cmvae_engine.kernels import backends
from cmvae_engine.kernels.densities import Family
from cmvae_engine.kernels.image_nll import image_loglik_fused, image_loglik_ref
from cmvae_engine.kernels.importance_weights import importance_weights_fused, importance_weights_ref
from cmvae_engine.kernels.mixture_logpdf import mixture_logpdf_fused, mixture_logpdf_ref
from cmvae_engine.kernels.moe_logq import moe_logq_fused, moe_logq_ref

BACKENDS = ("auto", "torch", "triton", "ext")
ENV_VAR = "CMVAE_KERNELS"
_DEVICE_TYPES = ("cpu", "cuda")

log = logging.getLogger("cmvae_engine.kernels")
_logged: set[str] = set()
_requested = "auto"
# device type -> the concrete backend, or an error message when the requested backend cannot serve it.
_chosen: dict[str, tuple[str | None, str]] = {}


def _say_once(level: int, msg: str) -> None:
    if msg not in _logged:
        _logged.add(msg)
        log.log(level, msg)


def _choose(requested: str, device_type: str) -> tuple[str | None, str]:
    """(backend, '') or (None, why the requested backend cannot run on this device type)."""
    if requested == "torch":
        return "torch", ""
    if requested == "triton":
        reason = backends.triton_unavailable_reason(device_type)
        return ("triton", "") if not reason else (None, reason)
    if requested == "ext":
        reason = backends.ext_unavailable_reason(device_type)
        return ("ext", "") if not reason else (None, f"the C++/CUDA extension is unavailable: {reason}")
    # auto
    if device_type == "cuda":
        reason = backends.triton_unavailable_reason("cuda")
        if not reason:
            return "triton", ""
        _say_once(logging.WARNING, f"kernels: auto uses torch on cuda ({reason})")
        return "torch", ""
    reason = backends.ext_unavailable_reason()
    if not reason:
        return "ext", ""
    _say_once(logging.WARNING, f"kernels: auto uses torch on {device_type} (the C++ extension is unavailable: "
                               f"{reason})")
    return "torch", ""


def set_backend(name: str) -> None:
    """Request a backend for every later call. An explicit backend that cannot run here is an error now
    (ext: not built; triton: not installed, or neither CUDA nor TRITON_INTERPRET=1)."""
    global _requested
    if name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}; expected one of {'|'.join(BACKENDS)}")
    devices = _DEVICE_TYPES if torch.cuda.is_available() else ("cpu",)
    chosen = {dev: _choose(name, dev) for dev in devices}
    usable = [dev for dev in devices if chosen[dev][0] is not None]
    if not usable:
        raise ValueError(f"kernel backend {name!r} cannot run here: {chosen['cpu'][1]}")
    _requested = name
    _chosen.clear()
    _chosen.update(chosen)
    for dev in usable:
        _say_once(logging.INFO, f"kernels: {dev} tensors use the {chosen[dev][0]} backend (requested {name})")


def get_backend() -> str:
    """The requested backend (`auto`, `torch`, `triton` or `ext`)."""
    return _requested


def active_backend(device: torch.device | str) -> str:
    """The backend that serves tensors on `device` under the current request."""
    return _backend_for_type(torch.device(device).type)


def _backend_for_type(device_type: str) -> str:
    backend, reason = _chosen.get(device_type, ("torch", "") if _requested == "auto" else
                                  (None, "no fused kernels for this device type"))
    if backend is None:
        raise RuntimeError(f"kernel backend {_requested!r} cannot run on {device_type} tensors: {reason}; "
                           f"choose another with --kernels or {ENV_VAR}")
    return backend


def _initial_request() -> None:
    name = os.environ.get(ENV_VAR, "auto") or "auto"
    try:
        set_backend(name)
    except ValueError as e:
        raise ValueError(f"{ENV_VAR}={name!r}: {e} (unset it to let `auto` choose)") from None


_initial_request()


def mixture_logpdf(
    z: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor, log_pi: torch.Tensor, family: Family,
    with_posterior: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """log p(z) [N] of the mixture prior (and on request p(c|z) [N, K] and its entropy [N]); see
    kernels/mixture_logpdf.py."""
    backend = _backend_for_type(z.device.type)
    if backend == "torch":
        return mixture_logpdf_ref(z, loc, scale, log_pi, family, with_posterior)
    return mixture_logpdf_fused(z, loc, scale, log_pi, family, with_posterior, backend)


def moe_logq(z: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor, family: Family) -> torch.Tensor:
    """log q(z|X) [M, S, B] of the mixture-of-experts posterior; see kernels/moe_logq.py."""
    backend = _backend_for_type(z.device.type)
    if backend == "torch":
        return moe_logq_ref(z, loc, scale, family)
    return moe_logq_fused(z, loc, scale, family, backend)


def importance_weights(lw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(IWAE bound [B], weights [M, S, B], squared weights); see kernels/importance_weights.py."""
    backend = _backend_for_type(lw.device.type)
    if backend == "torch":
        return importance_weights_ref(lw)
    return importance_weights_fused(lw, backend)


def image_loglik(pred: torch.Tensor, target: torch.Tensor, scale: float, family: Family) -> torch.Tensor:
    """sum over pixels of log F(target | pred, scale) -> [..., B]; see kernels/image_nll.py."""
    backend = _backend_for_type(pred.device.type)
    if backend == "torch":
        return image_loglik_ref(pred, target, scale, family)
    return image_loglik_fused(pred, target, scale, family, backend)
