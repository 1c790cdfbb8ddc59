"""The goal criterion of bench/mfcvae_goal.py: each factor captured by one facet and by no other, distinct facets."""

from __future__ import annotations

from cmvae_engine.bench.mfcvae_goal import judge


def _facets(nmi: list[list[float]]) -> list[dict]:
    """nmi[j][f]: facet j's NMI with factor f (digit, colour)."""
    return [{"facet": j, "n_clusters": 4, "scores": {"digit": {"nmi": row[0]}, "colour": {"nmi": row[1]}}}
            for j, row in enumerate(nmi)]


def test_each_factor_in_its_own_facet_passes():
    verdict = judge(_facets([[0.85, 0.02], [0.01, 0.99]]))
    assert verdict["pass"] and verdict["distinct_facets"]
    assert verdict["per_factor"]["digit"]["facet"] == 0 and verdict["per_factor"]["colour"]["facet"] == 1


def test_a_factor_leaking_into_the_other_facet_fails():
    verdict = judge(_facets([[0.85, 0.20], [0.01, 0.99]]))
    assert not verdict["pass"] and not verdict["per_factor"]["colour"]["ok"] and verdict["per_factor"]["digit"]["ok"]


def test_a_weak_factor_fails():
    assert not judge(_facets([[0.79, 0.02], [0.01, 0.99]]))["pass"]


def test_one_facet_capturing_both_factors_fails():
    verdict = judge(_facets([[0.9, 0.9], [0.1, 0.1]]))
    assert not verdict["distinct_facets"] and not verdict["pass"]
