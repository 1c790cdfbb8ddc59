"""The objective's probabilistic core as ops with one entry point each.

Model code calls these functions, never a backend. Every op has a plain-torch reference (`*_ref`) that
defines its math; faster backends are checked against it.
"""

from cmvae_engine.kernels.dispatch import (
    BACKENDS,
    active_backend,
    get_backend,
    image_loglik,
    importance_weights,
    mixture_logpdf,
    moe_logq,
    set_backend,
)

__all__ = ["BACKENDS", "active_backend", "get_backend", "image_loglik", "importance_weights", "mixture_logpdf",
           "moe_logq", "set_backend"]
