"""The selection rule of pruning on score sequences constructed for it: the one-cluster step never counts, only a
score strictly below the unpruned one is chosen, and every cluster is kept when none is; then the same rule
through `prune` on a run folder (prune.json and pruned.pt)."""

import json
import math

import pytest
import torch

from cmvae_engine.cmvae.config import ModelConfig
from cmvae_engine.cmvae.data import synth_polydigits
from cmvae_engine.cmvae.prune import choose
from cmvae_engine.engine import prune_run as prune_run_module
from cmvae_engine.engine.config import DataConfig, OptimConfig, TrainConfig
from cmvae_engine.engine.prune_run import prune_run
from cmvae_engine.engine.trainer import train


def curve_of(pnes: list[float], k0: int | None = None) -> list[dict]:
    """A pruning curve with these scores: step s has k0 - s clusters; cluster k0 - s is removed at step s."""
    k0 = k0 or len(pnes)
    return [{"k": k0 - s, "active": list(range(k0 - s)), "pne": p, "entropy": 0.0, "loglik": 0.0}
            for s, p in enumerate(pnes)]


def test_the_one_cluster_step_is_never_chosen_even_when_it_scores_lowest():
    res = choose(curve_of([5.0, 4.0, 3.0, 4.5, -100.0]))  # K 5, 4, 3, 2, 1
    assert res.chosen_k == 3 and res.chosen == [0, 1, 2] and res.improved


def test_when_only_the_one_cluster_step_is_below_every_cluster_is_kept():
    res = choose(curve_of([5.0, 6.0, 7.0, 8.0, 1.0]))
    assert not res.improved and res.chosen_k == 5 and res.chosen == [0, 1, 2, 3, 4]
    # the smallest model that can be pruned: 2 clusters, whose only pruned step has 1 cluster
    res = choose(curve_of([1.0, -1.0]))
    assert not res.improved and res.chosen_k == 2


def test_a_score_equal_to_the_unpruned_one_is_not_an_improvement():
    res = choose(curve_of([2.0, 2.0, 2.0, 3.0, 0.0]))
    assert not res.improved and res.chosen_k == 5 and res.baseline_score == 2.0


def test_a_score_just_below_the_unpruned_one_is_chosen():
    below = math.nextafter(2.0, -math.inf)
    res = choose(curve_of([2.0, 2.5, below, 3.0, 0.0]))
    assert res.improved and res.chosen_k == 3


def test_the_lowest_qualifying_score_wins_and_ties_keep_the_larger_set():
    res = choose(curve_of([10.0, 9.0, 7.0, 8.0, 7.0, 9.5, 0.0]))  # K 7..1: 7.0 at K=5 and at K=3
    assert res.improved and res.chosen_k == 5
    res = choose(curve_of([10.0, 9.0, 7.0, 8.0, 6.5, 9.5, 0.0]))
    assert res.improved and res.chosen_k == 3


def test_every_score_above_the_unpruned_one_keeps_every_cluster():
    res = choose(curve_of([1.0, 1.5, 2.0, 2.5, 3.0]))
    assert not res.improved and res.chosen == [0, 1, 2, 3, 4] and res.curve[0]["pne"] == res.baseline_score


def test_non_finite_scores_never_qualify():
    res = choose(curve_of([5.0, math.nan, 4.0, -math.inf, 0.0]))  # K 5..1
    assert res.improved and res.chosen_k == 3
    res = choose(curve_of([math.nan, 1.0, 0.5, 0.0]))
    assert not res.improved and res.chosen_k == 4


# ----- the same rule through `prune` on a run folder --------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("prunesel")
    data = synth_polydigits(base / "pd3", n_modalities=3, n_train=64, n_valid=32, n_test=32, seed=0)
    cfg = TrainConfig(model=ModelConfig(n_clusters=5, z_dim=8, w_dim=4, width=0.0625),
                      data=DataConfig(dataset=str(data)),
                      optim=OptimConfig(epochs=1, batch_size=32, lr=3e-3, max_steps=2), out=str(base / "run"),
                      log_every=1, eval_every=0)
    train(cfg)
    return base / "run"


@pytest.mark.parametrize("pnes, chosen_k, improved", [
    ([5.0, 4.0, 3.0, 4.5, -100.0], 3, True),    # the one-cluster step scores lowest: excluded
    ([5.0, 6.0, 5.0, 8.0, 1.0], 5, False),      # equal is not below; only K=1 is below: all kept
    ([5.0, 6.0, 7.0, 4.0, 9.0], 2, True),       # a qualifying K=2
])
def test_prune_command_writes_what_the_rule_chose(tiny_run, monkeypatch, pnes, chosen_k, improved):
    monkeypatch.setattr(prune_run_module, "prune_latents", lambda *a, **kw: choose(curve_of(pnes)))
    report = prune_run(tiny_run, device="cpu")
    on_disk = json.loads((tiny_run / "prune.json").read_text())
    for r in (report, on_disk):
        assert r["chosen_k"] == chosen_k and r["improved"] is improved and r["chosen"] == list(range(chosen_k))
        assert r["baseline_score"] == pnes[0] and r["chosen_score"] == pnes[5 - chosen_k]
    ckpt = torch.load(tiny_run / "pruned.pt", weights_only=True, map_location="cpu")
    active = ckpt["model"]["cluster_active"]
    assert active.tolist() == [c < chosen_k for c in range(5)]
    assert ("all 5 clusters are kept" in report["note"]) == (not improved)
