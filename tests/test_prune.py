"""Post-hoc cluster selection: recovery on a known mixture, the selection and tie rules, entropy
normalisations, assignment rules, and agreement with a step-by-step implementation that re-scores the whole
model at each step through model.cluster_posterior."""

import copy
import math
from collections import Counter

import numpy as np
import pytest
import torch

from cmvae_engine.cmvae.clustering import assign_clusters
from cmvae_engine.cmvae.config import ModelConfig
from cmvae_engine.cmvae.distributions import rsample
from cmvae_engine.cmvae.metrics import clustering_scores
from cmvae_engine.cmvae.model import CMVAE
from cmvae_engine.cmvae.prune import apply_pruning, draw_latents, prune_latents, prune_model
from cmvae_engine.engine.prune_run import _note


def make_model(k, z_dim=4, m=3, locs=None, logits=None):
    model = CMVAE(ModelConfig(n_modalities=m, n_clusters=k, z_dim=z_dim, w_dim=2, width=0.0625))
    with torch.no_grad():
        if locs is not None:
            model.prior_loc.copy_(locs)
        if logits is not None:
            model.prior_logits.copy_(logits)
    return model.eval()


def draw_from(model, clusters, g):
    """One z per modality and datapoint from the prior components `clusters` [N] -> [M, N, Dz]."""
    _, loc, scale = model.prior_params()
    m = model.config.n_modalities
    return rsample(loc[clusters].expand(m, -1, -1), scale[clusters].expand(m, -1, -1), "laplace", generator=g)


@pytest.fixture(scope="module")
def known_mixture():
    """K=20: 7 true well-separated components (data come from these), 6 spurious ones near true means with
    small weights, 7 spurious ones far from all data; ids shuffled so that no rule can lean on the order."""
    g = torch.Generator().manual_seed(0)
    k, t, dz = 20, 7, 8
    true = torch.randn(t, dz, generator=g) * 8
    locs, logits = torch.empty(k, dz), torch.zeros(k)
    locs[:t] = true
    locs[t:t + 6] = true[:6] + 1.5 * torch.randn(6, dz, generator=g)
    logits[t:t + 6] = -2.0
    locs[t + 6:] = 40 + torch.randn(k - t - 6, dz, generator=g)
    perm = torch.randperm(k, generator=g)
    model = make_model(k, dz, locs=locs[perm], logits=logits[perm])
    true_ids = torch.argsort(perm)[:t]
    labels = torch.arange(700) % t
    z = draw_from(model, true_ids[labels], g)
    return model, z, labels.numpy(), sorted(true_ids.tolist())


def test_known_mixture_recovers_the_true_clusters(known_mixture):
    model, z, labels, true_ids = known_mixture
    res = prune_latents(model, z, beta=2.5, labels=labels)
    assert res.improved
    assert res.chosen_k == 7 and res.chosen == true_ids
    assert len(res.curve) == 20  # K-1 pruning steps + the unpruned set
    assert [e["k"] for e in res.curve] == list(range(20, 0, -1))
    chosen = next(e for e in res.curve if e["k"] == 7)
    assert chosen["nmi"] == pytest.approx(1.0) and chosen["acc"] == pytest.approx(1.0)
    assert chosen["pne"] == min(e["pne"] for e in res.curve[:-1])
    assert res.baseline_score == res.curve[0]["pne"]
    assert bool(model.cluster_active.all())  # prune_latents leaves the model alone


@torch.no_grad()
def slow_prune(model, z, beta, entropy_norm, assign):
    """Independent step-by-step version: mask the model, re-score everything with model.cluster_posterior,
    assign and weigh with Python containers. Returns [(active ids, pne, entropy, loglik, assignment)]."""
    model = copy.deepcopy(model)
    k_total, dz = model.config.n_clusters, model.config.z_dim
    active = list(range(k_total))
    out = []
    while True:
        model.cluster_active.zero_()
        model.cluster_active[active] = True
        logp, resp, ent = model.cluster_posterior(z)
        k = len(active)
        norm = math.log(k_total) if entropy_norm == "initial" else math.log(k)
        h = float((ent / norm).mean()) if norm > 0 else 0.0
        ll = float((logp / dz).mean())
        avg = resp.mean(0)
        if assign == "vote":
            per = resp.argmax(-1).t().tolist()
            cluster = []
            for votes in per:
                counts = Counter(votes)
                top = max(counts.values())
                cluster.append(min(c for c, n in counts.items() if n == top))
        else:
            cluster = avg.argmax(-1).tolist()
        conf = avg.max(-1).values.tolist()
        out.append((list(active), beta * h - ll, h, ll, np.array(cluster)))
        if k == 1:
            return out
        mass = {c: 0.0 for c in active}
        for c, w in zip(cluster, conf, strict=True):
            mass[c] += w
        low = min(mass.values())
        active.remove(max(c for c in active if mass[c] == low))


@pytest.mark.parametrize("assign", ["vote", "confidence"])
@pytest.mark.parametrize("entropy_norm", ["initial", "active"])
def test_matches_step_by_step_version(assign, entropy_norm):
    g = torch.Generator().manual_seed(3)
    k = 9
    model = make_model(k, 4, locs=torch.rand(k, 4, generator=g) * 6 - 3, logits=torch.randn(k, generator=g))
    z = torch.randn(3, 157, 4, generator=g) * 2
    labels = np.arange(157) % 4
    res = prune_latents(model, z, beta=1.7, labels=labels, entropy_norm=entropy_norm, assign=assign)
    ref = slow_prune(model, z, 1.7, entropy_norm, assign)
    assert len(res.curve) == len(ref) == k
    for e, (active, pne, h, ll, cluster) in zip(res.curve, ref, strict=True):
        assert e["active"] == active
        assert e["pne"] == pytest.approx(pne, abs=1e-5)
        assert e["entropy"] == pytest.approx(h, abs=1e-6)
        assert e["loglik"] == pytest.approx(ll, abs=1e-5)
        for key, value in clustering_scores(labels, cluster).items():
            assert e[key] == pytest.approx(value)


def test_curve_metrics_match_clustering_scores_of_the_vote(known_mixture):
    model, z, labels, _ = known_mixture
    res = prune_latents(model, z, beta=2.5, labels=labels)
    masked = copy.deepcopy(model)
    for e in res.curve[::4]:
        masked.cluster_active.zero_()
        masked.cluster_active[e["active"]] = True
        _, vote = assign_clusters(masked.cluster_posterior(z)[1])
        expected = clustering_scores(labels, vote.numpy())
        assert {k: e[k] for k in expected} == pytest.approx(expected)


def test_ties_go_to_the_highest_id():
    # Data only from clusters 0 and 1; clusters 2..5 sit far away and get zero mass each: equal masses.
    locs = torch.tensor([[-6.0] * 4, [6.0] * 4, [50.0] * 4, [60.0] * 4, [70.0] * 4, [80.0] * 4])
    model = make_model(6, 4, locs=locs)
    z = draw_from(model, torch.arange(200) % 2, torch.Generator().manual_seed(1))
    res = prune_latents(model, z, beta=2.5)
    assert [e["active"] for e in res.curve[:5]] == [[0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4], [0, 1, 2, 3], [0, 1, 2],
                                                    [0, 1]]
    assert res.chosen == [0, 1] and res.improved


def test_no_improvement_keeps_every_cluster_and_says_so():
    # Three used, well-separated clusters: removing any costs likelihood, so nothing beats the unpruned set.
    locs = torch.tensor([[-10.0] * 4, [0.0] * 4, [10.0] * 4])
    model = make_model(3, 4, locs=locs)
    z = draw_from(model, torch.arange(300) % 3, torch.Generator().manual_seed(2))
    res = prune_latents(model, z, beta=2.5, labels=np.arange(300) % 3)
    assert not res.improved
    assert res.chosen == [0, 1, 2] and res.chosen_k == 3
    assert all(e["pne"] >= res.baseline_score for e in res.curve[1:-1])
    assert "all 3 clusters are kept" in _note(res, 3, res.baseline_score)


def test_entropy_norms(known_mixture):
    model, z, _, _ = known_mixture
    initial = prune_latents(model, z, beta=2.5, entropy_norm="initial")
    active = prune_latents(model, z, beta=2.5, entropy_norm="active")
    assert [e["active"] for e in initial.curve] == [e["active"] for e in active.curve]
    for a, b in zip(initial.curve[:-1], active.curve[:-1], strict=True):
        assert b["entropy"] == pytest.approx(a["entropy"] * math.log(20) / math.log(a["k"]), rel=1e-5)
        assert b["loglik"] == a["loglik"]
    assert active.curve[-1]["k"] == 1 and active.curve[-1]["entropy"] == 0.0
    assert active.curve[-1]["pne"] == pytest.approx(-active.curve[-1]["loglik"])


def test_confidence_assignment_is_the_argmax_of_the_averaged_responsibility():
    g = torch.Generator().manual_seed(5)
    model = make_model(5, 3, locs=torch.randn(5, 3, generator=g) * 3)
    z = torch.randn(3, 64, 3, generator=g) * 3
    labels = model.cluster_posterior(z)[1].mean(0).argmax(-1).numpy()  # labels = the rule itself
    res = prune_latents(model, z, beta=2.5, labels=labels, assign="confidence")
    assert res.curve[0]["nmi"] == pytest.approx(1.0) and res.curve[0]["acc"] == 1.0


def test_prune_model_is_one_encoder_pass_then_prune_latents():
    model = make_model(4, 4).train()
    images = torch.randint(0, 256, (3, 40, 3, 28, 28), dtype=torch.uint8)
    res = prune_model(model, images, beta=2.5, batch_size=16, generator=torch.Generator().manual_seed(7))
    z = draw_latents(model, images, batch_size=16, generator=torch.Generator().manual_seed(7))
    assert z.shape == (3, 40, 4)
    again = prune_latents(model, z, beta=2.5)
    assert res.chosen == again.chosen and [e["pne"] for e in res.curve] == [e["pne"] for e in again.curve]
    assert model.training and bool(model.cluster_active.all())


def test_apply_pruning_masks_the_prior():
    model = make_model(5, 4)
    apply_pruning(model, [3, 1])
    assert model.cluster_active.tolist() == [False, True, False, True, False]
    log_pi = model.prior_params()[0]
    assert torch.isinf(log_pi[[0, 2, 4]]).all() and torch.exp(log_pi).sum().item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="not an active cluster"):
        model.generate(2, cluster=0)
    # Pruning again starts from the active set.
    res = prune_latents(model, torch.randn(3, 20, 4), beta=2.5)
    assert res.curve[0]["active"] == [1, 3] and len(res.curve) == 2
    with pytest.raises(ValueError, match="subset of 0..4"):
        apply_pruning(model, [7])
    with pytest.raises(ValueError, match="subset"):
        apply_pruning(model, [])


def test_bad_inputs_are_refused():
    model = make_model(4, 4)
    with pytest.raises(ValueError, match=r"z must be \[M=3, N, Dz=4\]"):
        prune_latents(model, torch.randn(2, 10, 4), beta=1.0)
    with pytest.raises(ValueError, match="--entropy-norm"):
        prune_latents(model, torch.randn(3, 10, 4), beta=1.0, entropy_norm="final")
    with pytest.raises(ValueError, match="--assign"):
        prune_latents(model, torch.randn(3, 10, 4), beta=1.0, assign="mean")
    with pytest.raises(ValueError, match="labels has 3 entries"):
        prune_latents(model, torch.randn(3, 10, 4), beta=1.0, labels=[0, 1, 2])
    with pytest.raises(ValueError, match="at least 2 active clusters"):
        prune_latents(make_model(1, 4), torch.randn(3, 10, 4), beta=1.0)
