"""Clustering metrics against independent formulas, scikit-learn and brute force; Frechet distance
against the direct scipy computation (sqrtm of the covariance product)."""

import itertools
import math

import numpy as np
import pytest
import scipy.linalg
import torch
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from cmvae_engine.cmvae.evaluation.fid import GaussianStats, fid_from_features, frechet_distance
from cmvae_engine.cmvae.metrics import cluster_acc, clustering_scores


def table(labels, clusters):
    _, li = np.unique(labels, return_inverse=True)
    _, ci = np.unique(clusters, return_inverse=True)
    t = np.zeros((ci.max() + 1, li.max() + 1))
    np.add.at(t, (ci, li), 1)
    return t


def nmi_formula(labels, clusters):
    t = table(labels, clusters)
    p = t / t.sum()
    pc, pl = p.sum(1), p.sum(0)
    nz = p > 0
    mi = (p[nz] * np.log(p[nz] / np.outer(pc, pl)[nz])).sum()
    h = lambda q: -(q[q > 0] * np.log(q[q > 0])).sum()  # noqa: E731
    denom = 0.5 * (h(pc) + h(pl))
    return 1.0 if denom == 0 else mi / denom


def ari_formula(labels, clusters):
    t = table(labels, clusters)
    c2 = lambda x: x * (x - 1) / 2  # noqa: E731
    index, a, b = c2(t).sum(), c2(t.sum(1)).sum(), c2(t.sum(0)).sum()
    expected = a * b / c2(t.sum())
    return (index - expected) / (0.5 * (a + b) - expected)


def acc_brute_force(labels, clusters):
    """Best accuracy over every one-to-one map of cluster ids to label ids (unmatched clusters count 0)."""
    lab, clu = np.unique(labels), np.unique(clusters)
    n = max(len(lab), len(clu))
    best = 0
    for perm in itertools.permutations(range(n)):
        hits = sum(int(np.sum((clusters == c) & (labels == lab[perm[i]])))
                   for i, c in enumerate(clu) if perm[i] < len(lab))
        best = max(best, hits)
    return best / len(labels)


def test_known_partitions():
    labels = np.array([0, 0, 1, 1, 2, 2])
    assert clustering_scores(labels, np.array([5, 5, 3, 3, 9, 9])) == {"nmi": 1.0, "ari": 1.0, "acc": 1.0,
                                                                        "n_clusters": 3}
    # Two labels split into three clusters: the middle cluster straddles both, the best map hits 4 of 6.
    s = clustering_scores(np.array([0, 0, 0, 1, 1, 1]), np.array([0, 0, 1, 1, 2, 2]))
    assert s["acc"] == pytest.approx(4 / 6)
    assert s["n_clusters"] == 3
    # Hand-computed ARI: index 2, a = 3, b = 6, expected 18/15 -> (2 - 1.2) / (4.5 - 1.2).
    assert s["ari"] == pytest.approx(0.8 / 3.3)
    everyone_alone = clustering_scores(labels, np.arange(6))
    assert everyone_alone["acc"] == pytest.approx(0.5) and everyone_alone["ari"] == pytest.approx(0.0)


@pytest.mark.parametrize("seed", range(6))
def test_metrics_match_formulas_sklearn_and_brute_force(seed):
    rng = np.random.default_rng(seed)
    n, n_lab, n_clu = int(rng.integers(8, 40)), int(rng.integers(2, 5)), int(rng.integers(1, 6))
    labels = rng.integers(0, n_lab, n) * 7 + 3  # arbitrary label ids
    clusters = np.where(rng.random(n) < 0.6, labels % n_clu, rng.integers(0, n_clu, n)) * 11
    s = clustering_scores(labels, clusters)
    assert s["nmi"] == pytest.approx(nmi_formula(labels, clusters), abs=1e-10)
    assert s["nmi"] == pytest.approx(normalized_mutual_info_score(labels, clusters, average_method="arithmetic"))
    if len(np.unique(clusters)) > 1:
        assert s["ari"] == pytest.approx(ari_formula(labels, clusters), abs=1e-10)
    assert s["ari"] == pytest.approx(adjusted_rand_score(labels, clusters))
    assert s["acc"] == pytest.approx(acc_brute_force(labels, clusters))
    assert s["n_clusters"] == len(np.unique(clusters))


def test_acc_brute_force_more_clusters_than_labels():
    rng = np.random.default_rng(7)
    for _ in range(20):
        labels, clusters = rng.integers(0, 3, 15), rng.integers(0, 6, 15)
        assert cluster_acc(labels, clusters) == pytest.approx(acc_brute_force(labels, clusters))


def scipy_fid(mu1, s1, mu2, s2):
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean).real)


def features(rng, n, d, shift=0.0, scale=1.0):
    mix = rng.standard_normal((d, d)) / math.sqrt(d)
    return rng.standard_normal((n, d)) @ mix * scale + shift


@pytest.mark.parametrize("d", [1, 7, 64])
def test_frechet_distance_matches_scipy(d):
    rng = np.random.default_rng(d)
    a, b = features(rng, 400, d), features(rng, 300, d, shift=0.3, scale=1.7)
    mu1, s1 = a.mean(0), np.atleast_2d(np.cov(a, rowvar=False))
    mu2, s2 = b.mean(0), np.atleast_2d(np.cov(b, rowvar=False))
    expected = scipy_fid(mu1, s1, mu2, s2)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-9 * np.trace(s1))
    # From features: the n >= d path (covariance root of the reference set).
    ref = GaussianStats.of(torch.from_numpy(a))
    assert fid_from_features(ref, torch.from_numpy(b)) == pytest.approx(expected, rel=1e-9)


@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")  # scipy's side: sqrtm of a singular product
@pytest.mark.parametrize("n", [2, 3, 20])
def test_fid_from_few_features_matches_scipy(n):
    """n < d: the n x n path gives the same value as the full d x d computation."""
    rng = np.random.default_rng(n)
    d = 48
    a, b = features(rng, 30, d), features(rng, n, d, shift=-0.2)
    ref = GaussianStats.of(torch.from_numpy(a))
    expected = scipy_fid(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    assert fid_from_features(ref, torch.from_numpy(b)) == pytest.approx(expected, rel=1e-6)


def test_fid_refuses_a_single_sample():
    ref = GaussianStats.of(torch.randn(5, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="at least 2"):
        fid_from_features(ref, torch.randn(1, 4))
