"""Clustering metrics: NMI (arithmetic normalisation), ARI, and ACC with Hungarian matching."""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score


def confusion(labels: np.ndarray, clusters: np.ndarray) -> np.ndarray:
    """Square count matrix [clusters x labels], padded with zeros to the larger side."""
    labels = np.asarray(labels)
    clusters = np.asarray(clusters)
    _, li = np.unique(labels, return_inverse=True)
    _, ci = np.unique(clusters, return_inverse=True)
    n = max(li.max(initial=-1), ci.max(initial=-1)) + 1
    mat = np.zeros((n, n), dtype=np.int64)
    np.add.at(mat, (ci, li), 1)
    return mat


def contingency(labels: np.ndarray, clusters: np.ndarray) -> dict:
    """{'clusters': cluster ids in use, 'labels': label values, 'counts': [cluster][label]} (JSON-ready)."""
    labels, clusters = np.asarray(labels), np.asarray(clusters)
    label_ids, li = np.unique(labels, return_inverse=True)
    cluster_ids, ci = np.unique(clusters, return_inverse=True)
    mat = np.zeros((len(cluster_ids), len(label_ids)), dtype=np.int64)
    np.add.at(mat, (ci, li), 1)
    return {"clusters": cluster_ids.tolist(), "labels": label_ids.tolist(), "counts": mat.tolist()}


def cluster_acc(labels: np.ndarray, clusters: np.ndarray) -> float:
    """Accuracy under the best one-to-one map of clusters to labels (Hungarian on the padded confusion)."""
    if len(labels) == 0:
        return float("nan")
    mat = confusion(labels, clusters)
    rows, cols = linear_sum_assignment(-mat)
    return float(mat[rows, cols].sum() / len(labels))


def clustering_scores(labels: np.ndarray, clusters: np.ndarray) -> dict[str, float]:
    """{'nmi', 'ari', 'acc', 'n_clusters'} of a partition against true labels."""
    labels = np.asarray(labels)
    clusters = np.asarray(clusters)
    return {
        "nmi": float(normalized_mutual_info_score(labels, clusters, average_method="arithmetic")),
        "ari": float(adjusted_rand_score(labels, clusters)),
        "acc": cluster_acc(labels, clusters),
        "n_clusters": int(len(np.unique(clusters))),
    }
