"""Scores of an MFCVAE: per facet and per labelled factor NMI, ARI, ACC (Hungarian, one cluster per label, as for
CMVAE) and the many-to-one ACC the MFCVAE paper reports (each cluster mapped to its majority label); latent probes
per facet (a classifier on the posterior means of z_j for each factor, paper Table 1)."""

from __future__ import annotations

import numpy as np
import torch

from cmvae_engine.cmvae.clustering import to_float
from cmvae_engine.cmvae.evaluation.latent_probe import probe_accuracy, subsample
from cmvae_engine.cmvae.metrics import clustering_scores, confusion
from cmvae_engine.cmvae.mfcvae.model import MFCVAE
from cmvae_engine.cmvae.progress import ProgressFn, batches, report


def many_to_one_acc(labels: np.ndarray, clusters: np.ndarray) -> float:
    """Share of points whose cluster's majority label is their label (any number of clusters per label)."""
    if len(labels) == 0:
        return float("nan")
    return float(confusion(labels, clusters).max(axis=1).sum() / len(labels))  # rows: clusters


def factor_scores(labels: np.ndarray, clusters: np.ndarray) -> dict[str, float]:
    s = clustering_scores(labels, clusters)
    return {"nmi": s["nmi"], "ari": s["ari"], "acc": s["acc"], "acc_many_to_one": many_to_one_acc(labels, clusters)}


@torch.no_grad()
def encode_facets(model: MFCVAE, images: torch.Tensor, batch_size: int = 512, progress: ProgressFn | None = None
                  ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """images uint8 [N, C, H, W] (any device) -> per facet (posterior means [N, D_j], assignments [N], the argmax
    of eq. 12 in closed form) as numpy."""
    device = model.priors.loc[0].device
    means: list[list[torch.Tensor]] = [[] for _ in range(model.n_facets)]
    assign: list[list[torch.Tensor]] = [[] for _ in range(model.n_facets)]
    n_batches = batches(images.shape[0], batch_size)
    for i, start in enumerate(range(0, images.shape[0], batch_size)):
        x = to_float(images[start:start + batch_size].to(device))
        post = model.posterior(x)
        for j, (m, _) in enumerate(post):
            means[j].append(m.cpu())
        for j, q in enumerate(model.assign(x)):
            assign[j].append(q.argmax(-1).cpu())
        report(progress, i + 1, n_batches)
    return [torch.cat(m).numpy() for m in means], [torch.cat(a).numpy() for a in assign]


def facet_table(assignments: list[np.ndarray], labels: np.ndarray, factors: list[str],
                n_clusters: list[int]) -> list[dict]:
    """[{"facet": j, "n_clusters": K_j, "used_clusters": .., "scores": {factor: {nmi, ari, acc, acc_many_to_one}}}]
    for labels [N, F] (column f is factor factors[f])."""
    labels = labels[:, None] if labels.ndim == 1 else labels
    out = []
    for j, a in enumerate(assignments):
        out.append({"facet": j, "n_clusters": int(n_clusters[j]), "used_clusters": int(len(np.unique(a))),
                    "scores": {name: factor_scores(labels[:, f], a) for f, name in enumerate(factors)}})
    return out


def facet_probes(train_means: list[np.ndarray], train_labels: np.ndarray, test_means: list[np.ndarray],
                 test_labels: np.ndarray, factors: list[str], *, n_train: int | None = 5000, seed: int = 0
                 ) -> list[dict]:
    """Per facet, per factor: test accuracy of a logistic regression on the posterior means of z_j, fitted on (a
    subset of) the train split. [{"facet": j, "accuracy": {factor: acc}, "chance": {factor: majority share}}]."""
    rng = np.random.default_rng(seed)
    tr = subsample(len(train_labels), n_train, rng)
    y_tr = train_labels[:, None] if train_labels.ndim == 1 else train_labels
    y_te = test_labels[:, None] if test_labels.ndim == 1 else test_labels
    chance = {name: float(np.bincount(y_te[:, f]).max() / len(y_te)) for f, name in enumerate(factors)}
    return [{"facet": j, "accuracy": {name: probe_accuracy(a[tr], y_tr[tr, f], b, y_te[:, f], seed)
                                      for f, name in enumerate(factors)}, "chance": chance}
            for j, (a, b) in enumerate(zip(train_means, test_means, strict=True))]
