"""CMVAE: clustering multimodal VAE (model, objectives, data).

The top-level names load lazily so that `cmvae.data` (used in decoding worker processes) does not import
the model and its dependencies.
"""

from __future__ import annotations

from typing import Any

__all__ = ["CMVAE", "ModelConfig", "loss_fn"]


def __getattr__(name: str) -> Any:
    if name == "CMVAE":
        from cmvae_engine.cmvae.model import CMVAE
        return CMVAE
    if name == "ModelConfig":
        from cmvae_engine.cmvae.config import ModelConfig
        return ModelConfig
    if name == "loss_fn":
        from cmvae_engine.cmvae.objectives import loss_fn
        return loss_fn
    raise AttributeError(f"module 'cmvae' has no attribute {name!r}")
