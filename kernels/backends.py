"""Where each backend's forward and backward functions come from, and whether a backend can run.

- `torch`: explicit plain-torch formulas in kernels/<op>.py (the public functions use the `*_ref` instead);
- `triton`: the launchers in kernels/<op>.py (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1);
- `ext`: the C++/CUDA extension, `kernels.extension.<op>_fwd` / `<op>_bwd`, imported lazily: when the module
  or a function is missing the backend is simply unavailable.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from types import ModuleType

from cmvae_engine.kernels._triton import HAS_TRITON, INTERPRETING

OPS = ("mixture_logpdf", "moe_logq", "importance_weights", "image_loglik")


@functools.cache
def _extension_module() -> tuple[ModuleType | None, str]:
    try:
        return importlib.import_module("cmvae_engine.kernels.extension"), ""
    except ImportError as e:
        return None, f"kernels.extension cannot be imported ({e})"


def _extension(device_type: str = "cpu") -> tuple[ModuleType | None, str]:
    """The extension module when it can run ops on tensors of this device type, else (None, why not).
    Availability is asked each time: the module caches a loaded library, and retries after a failure (a build
    may have appeared since)."""
    mod, reason = _extension_module()
    if mod is None:
        return None, reason
    try:
        if not mod.available():
            return None, str(mod.unavailable_reason())
    except AttributeError as e:
        return None, f"kernels.extension lacks available()/unavailable_reason() ({e})"
    missing = [f"{op}_{kind}" for op in OPS for kind in ("fwd", "bwd") if not hasattr(mod, f"{op}_{kind}")]
    if missing:
        return None, f"kernels.extension lacks {', '.join(missing)}"
    if device_type == "cuda" and not getattr(mod, "has_cuda_kernels", lambda: False)():
        return None, "the extension was built without CUDA kernels (needs a CUDA torch and nvcc at build time)"
    return mod, ""


def ext_unavailable_reason(device_type: str = "cpu") -> str:
    """'' when the extension can run on tensors of this device type, else why not."""
    return _extension(device_type)[1]


def triton_unavailable_reason(device_type: str) -> str:
    """'' when the Triton kernels can run on tensors of this device type, else why not."""
    if not HAS_TRITON:
        return "triton is not installed (install the `gpu` extra)"
    if device_type == "cuda" or (device_type == "cpu" and INTERPRETING):
        return ""
    if device_type == "cpu":
        return "Triton needs CUDA tensors, or TRITON_INTERPRET=1 set before `kernels` is imported for CPU tensors"
    return f"Triton kernels do not run on {device_type} tensors"


def lookup(op: str, backend: str, kind: str, local: dict[str, tuple[Callable, Callable]]) -> Callable:
    """The `kind` ('fwd' or 'bwd') function of `backend` for `op`; `local` holds the op file's own backends."""
    index = 0 if kind == "fwd" else 1
    if backend in local:
        return local[backend][index]
    if backend == "ext":
        mod, reason = _extension_module()
        if mod is None:
            raise RuntimeError(f"kernel backend 'ext' for {op}: {reason}")
        return getattr(mod, f"{op}_{kind}")
    raise ValueError(f"unknown kernel backend {backend!r} for {op}; expected one of {(*local, 'ext')}")
