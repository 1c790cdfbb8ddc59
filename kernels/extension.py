"""The C++/CUDA extension backend: the library built from kernels/csrc/ (CPU ops always, CUDA ops where torch has
CUDA and nvcc was found), loaded from kernels/_build/ with `torch.ops.load_library`.

Importing this module never builds anything: `tools/build_extension.py` (run by `tools/setup.sh`) or `build()` does.
`available()` loads the library on first use; a missing, stale (other sources or another torch) or broken build
makes it False, with the reason in `unavailable_reason()`. The functions below are each op's forward and backward
with the signatures of the op contract; the math of each op is documented in kernels/<op>.py and kernels/csrc/.
"""

from __future__ import annotations

import threading
from pathlib import Path

import torch

from cmvae_engine.kernels import extension_build as _eb

_lock = threading.Lock()
_loaded: Path | None = None
_loaded_stamp: dict = {}
_reason: str | None = None  # None: not tried yet


def library_path() -> Path:
    return _eb.BUILD_DIR / _eb.library_name()


def _try_load() -> str:
    """'' once the library is loaded, else why it cannot be."""
    global _loaded, _loaded_stamp
    if _loaded is not None:
        return ""
    path = library_path()
    error = _eb.BUILD_DIR / _eb.ERROR_FILE
    if error.is_file():
        return f"the last build failed: {error.read_text().strip()} (details: tools/build_extension.py --verbose)"
    if not path.is_file():
        return "not built: run tools/build_extension.py"
    stale = _eb.stale_reason()
    if stale:
        return f"the build in {path.parent} is stale ({stale}): run tools/build_extension.py"
    try:
        torch.ops.load_library(str(path))
    except (OSError, RuntimeError) as e:
        return f"{path} does not load ({e}); rebuild with tools/build_extension.py --clean"
    _loaded, _loaded_stamp = path, _eb.read_stamp()
    return ""


def unavailable_reason() -> str:
    """'' when the extension's ops can run, else a one-line reason with the fix."""
    global _reason
    with _lock:
        if _reason is None or (_reason and _loaded is None):  # a failure is retried: a build may have appeared
            _reason = _try_load()
        return _reason


def available() -> bool:
    return unavailable_reason() == ""


def has_cuda_kernels() -> bool:
    """Whether the loaded library registered CUDA implementations (built against a CUDA torch with nvcc)."""
    if not available():
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key("cmvae_ext::mixture_logpdf_fwd", "CUDA")


def _identity(stamp: dict) -> tuple:
    return stamp.get("sources"), stamp.get("torch")


def build(verbose: bool = False, *, cuda: str = "auto", cuda_arch: str = "90", clean: bool = False) -> Path:
    """Builds the library (incrementally; `clean` starts over) and loads it. Returns its path.

    Raises `extension_build.BuildError` when it cannot be built, and RuntimeError when this process already holds
    a library built from other sources (ops registered once per process cannot be replaced: restart Python).
    """
    global _reason
    with _lock:
        path = _eb.build_library(verbose=verbose, cuda=cuda, cuda_arch=cuda_arch, clean=clean)
        if _loaded is not None and _identity(_eb.read_stamp()) != _identity(_loaded_stamp):
            raise RuntimeError("the extension was rebuilt from other sources after this process loaded it; "
                               "restart Python to use the new build")
        _reason = None
    if not available():
        raise RuntimeError(f"the extension was built but cannot be used: {unavailable_reason()}")
    return path


def _ops():
    if not available():
        raise RuntimeError(f"the C++/CUDA extension is unavailable: {unavailable_reason()}")
    return torch.ops.cmvae_ext


def mixture_logpdf_fwd(z: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor, log_pi: torch.Tensor,
                       is_laplace: bool, with_posterior: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (logp [N], resp [N, K], entropy [N]); resp and entropy have numel 0 unless with_posterior."""
    return _ops().mixture_logpdf_fwd(z, loc, scale, log_pi, is_laplace, with_posterior)


def mixture_logpdf_bwd(grad_logp: torch.Tensor, z: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor,
                       log_pi: torch.Tensor, logp: torch.Tensor, is_laplace: bool, need_z: bool = True,
                       need_params: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (g_z [N, D], g_loc [K, D], g_scale [K, D], g_log_pi [K]); a gradient not needed is skipped and empty [0]."""
    return _ops().mixture_logpdf_bwd(grad_logp, z, loc, scale, log_pi, logp, is_laplace, need_z, need_params)


def moe_logq_fwd(z: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor, is_laplace: bool) -> torch.Tensor:
    """z [M, S, B, D], loc/scale [E, B, D] -> log q [M, S, B]."""
    return _ops().moe_logq_fwd(z, loc, scale, is_laplace)


def moe_logq_bwd(grad_out: torch.Tensor, z: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor,
                 out: torch.Tensor, is_laplace: bool, need_params: bool = True
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (g_z [M, S, B, D], g_loc [E, B, D], g_scale [E, B, D]); need_params=False skips the parameter
    reductions (g_loc, g_scale empty [0])."""
    return _ops().moe_logq_bwd(grad_out, z, loc, scale, out, is_laplace, need_params)


def importance_weights_fwd(lw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """lw [M, S, B] -> (bound [B], weights [M, S, B], sq_weights [M, S, B])."""
    return _ops().importance_weights_fwd(lw)


def importance_weights_bwd(grad_bound: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """-> g_lw [M, S, B] = grad_bound[b] * weights / M."""
    return _ops().importance_weights_bwd(grad_bound, weights)


def image_loglik_fwd(pred: torch.Tensor, target: torch.Tensor, scale: float, is_laplace: bool) -> torch.Tensor:
    """pred [R, B, P] (any float dtype), target [B, P] -> [R, B] (float32 for low-precision pred)."""
    return _ops().image_loglik_fwd(pred, target, scale, is_laplace)


def image_loglik_bwd(grad_out: torch.Tensor, pred: torch.Tensor, target: torch.Tensor, scale: float,
                     is_laplace: bool) -> torch.Tensor:
    """-> g_pred [R, B, P] in pred's dtype."""
    return _ops().image_loglik_bwd(grad_out, pred, target, scale, is_laplace)
