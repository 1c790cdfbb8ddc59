"""Clustering quality of a trained model: NMI (arithmetic), ARI and ACC (Hungarian) of the majority vote
over modalities and of each modality's own assignment argmax_c p(c | z_m)."""

from __future__ import annotations

import numpy as np
import torch

from cmvae_engine.cmvae.clustering import assign_clusters, encode_split
from cmvae_engine.cmvae.metrics import clustering_scores, contingency
from cmvae_engine.cmvae.model import CMVAE
from cmvae_engine.cmvae.progress import ProgressFn


@torch.no_grad()
def clustering_evaluation(
    model: CMVAE, images: torch.Tensor, labels: np.ndarray, *, batch_size: int = 1024,
    generator: torch.Generator | None = None, progress: ProgressFn | None = None,
) -> dict:
    """images uint8 [M, N, C, H, W] -> {'vote': scores, 'per_modality': {'m0': scores, ...},
    'active_clusters': K', 'confusion': the vote's cluster x label counts} with scores {'nmi', 'ari', 'acc',
    'n_clusters'} (n_clusters: clusters used).

    One z ~ q_m(z|x_m) per datapoint and modality, as the reference and the training-time evaluation."""
    lat = encode_split(model, images, batch_size=batch_size, generator=generator, progress=progress)
    per_mod, vote = assign_clusters(lat.resp)
    per_mod, vote = per_mod.cpu().numpy(), vote.cpu().numpy()
    labels = np.asarray(labels)
    log_pi = model.prior_params()[0]
    return {
        "vote": clustering_scores(labels, vote),
        "confusion": contingency(labels, vote),
        "per_modality": {f"m{m}": clustering_scores(labels, per_mod[m]) for m in range(per_mod.shape[0])},
        "active_clusters": int(torch.isfinite(log_pi).sum()),
    }
