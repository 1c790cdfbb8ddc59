"""MFCVAE's math against independent computations: eq. 12 (the optimal q(c | x)) against brute force, the
one-sample ELBO of eq. 14 against torch.distributions, the fused op against the plain-torch path for the facet
shapes, the packed one-call path against one call per facet, the progressive schedule and the facet scores."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.distributions import Categorical, Normal, kl_divergence

from cmvae_engine import kernels
from cmvae_engine.cmvae.mfcvae.config import MFCVAEConfig
from cmvae_engine.cmvae.mfcvae.evaluation import facet_table, many_to_one_acc
from cmvae_engine.cmvae.mfcvae.model import MFCVAE
from cmvae_engine.cmvae.mfcvae.priors import FacetPriors, facet_log_densities, q_c_estimate, q_c_exact
from cmvae_engine.cmvae.mfcvae.schedule import facet_weights, schedule_end
from cmvae_engine.engine.mfcvae_recipe import ProgressiveRecipe
from cmvae_engine.kernels.backends import ext_unavailable_reason


@pytest.fixture
def backend():
    """Restore the requested kernel backend after a test that switches it."""
    saved = kernels.get_backend()
    yield kernels.set_backend
    kernels.set_backend(saved)


def tiny_config(**kw) -> MFCVAEConfig:
    base = dict(n_clusters=[3, 4], z_dims=[2, 3], hidden=[10, 6], image_channels=1, image_size=4, gmm_init=False,
                likelihood_scale=0.5)
    base.update(kw)
    return MFCVAEConfig(**base)


def _set_prior(priors: FacetPriors, j: int, loc, std, pi) -> None:
    with torch.no_grad():
        priors.loc[j].copy_(torch.as_tensor(loc, dtype=priors.loc[j].dtype))
        var = torch.as_tensor(std, dtype=priors.loc[j].dtype) ** 2
        priors.raw_var[j].copy_(torch.log(torch.expm1(10 * var)) / 10)  # inverse of softplus(beta = 10)
        priors.pi_logits[j].copy_(torch.log(torch.as_tensor(pi, dtype=priors.loc[j].dtype)))


def test_eq12_matches_brute_force_enumeration_and_monte_carlo(backend):
    backend("torch")
    torch.manual_seed(0)
    priors = FacetPriors(tiny_config(n_clusters=[3, 2], z_dims=[2, 2])).double()
    loc = [[-1.0, 0.5], [0.8, 0.0], [0.2, 1.5]]
    std = [[0.6, 0.9], [0.5, 0.4], [1.1, 0.7]]
    pi = [0.5, 0.3, 0.2]
    _set_prior(priors, 0, loc, std, pi)
    mean = torch.tensor([[0.3, 0.4], [-0.9, 0.7]], dtype=torch.float64)
    s = torch.tensor([[0.5, 0.3], [0.2, 0.8]], dtype=torch.float64)
    # brute force: for every c, E_q log p(c | z) by Monte Carlo with torch.distributions, then normalise exp(.)
    g = torch.Generator().manual_seed(1)
    n = 200_000
    z = mean[None] + s[None] * torch.randn((n, 2, 2), generator=g, dtype=torch.float64)  # [S, B, D]
    comps = [Normal(torch.tensor(loc[c], dtype=torch.float64), torch.tensor(std[c], dtype=torch.float64))
             for c in range(3)]
    joint = torch.stack([math.log(pi[c]) + comps[c].log_prob(z).sum(-1) for c in range(3)], -1)  # [S, B, K]
    e_log_post = (joint - torch.logsumexp(joint, -1, keepdim=True)).mean(0)  # [B, K]
    brute = torch.exp(e_log_post) / torch.exp(e_log_post).sum(-1, keepdim=True)
    exact = q_c_exact(mean, s, priors, 0)
    torch.testing.assert_close(exact, brute, atol=3e-3, rtol=0)
    estimate = q_c_estimate(z[:20_000], priors, 0)  # through the mixture_logpdf op, many samples
    torch.testing.assert_close(estimate, brute, atol=1e-2, rtol=0)
    assert not torch.allclose(exact, q_c_estimate(z[:1], priors, 0), atol=1e-2)  # one sample is only an estimate


def _direct_bound(model: MFCVAE, x: torch.Tensor, g: torch.Generator, kl_weight) -> tuple[torch.Tensor, ...]:
    """Eq. 14 term by term with torch.distributions at the same sample: q(c|x) = softmax(log p(z, c)),
    KL_z by Monte Carlo at the sample, KL_c between categoricals, a Gaussian pixel likelihood."""
    zs, kl_terms = [], []
    for j, (mean, std) in enumerate(model.encoder(x)):
        eps = torch.randn(mean.shape, generator=g, dtype=mean.dtype)
        z = mean + std * eps
        zs.append(z)
        loc, pstd, log_pi = model.priors.params(j)
        log_pz_c = Normal(loc[None], pstd[None]).log_prob(z[:, None]).sum(-1)  # [B, K]
        q_c = torch.softmax(log_pi[None] + log_pz_c, -1)
        log_q = Normal(mean, std).log_prob(z).sum(-1)
        kl_z = (q_c * (log_q[:, None] - log_pz_c)).sum(-1)
        kl_c = kl_divergence(Categorical(probs=q_c), Categorical(logits=log_pi.expand_as(q_c)))
        kl_terms.append(kl_z + kl_c)
    pred = model.decoder(zs, torch.ones(len(zs), dtype=x.dtype))
    rec = Normal(pred, model.config.likelihood_scale).log_prob(x).flatten(1).sum(-1)
    bound = rec - sum(kl_terms)
    weighted = rec - sum(w * k for w, k in zip(kl_weight, kl_terms, strict=True))
    return bound, -weighted.sum()


@pytest.mark.parametrize("packed", [True, False])
def test_the_bound_is_eq14_computed_with_torch_distributions(backend, packed):
    backend("torch")
    torch.manual_seed(2)
    model = MFCVAE(tiny_config()).double()
    x = torch.rand((5, 1, 4, 4), dtype=torch.float64)
    w = torch.tensor([0.3, 1.0], dtype=torch.float64)
    out = model(x, torch.ones(2, dtype=torch.float64), w, generator=torch.Generator().manual_seed(7), packed=packed)
    grads = torch.autograd.grad(out.loss, list(model.parameters()), allow_unused=True)
    bound, loss = _direct_bound(model, x, torch.Generator().manual_seed(7), w)
    torch.testing.assert_close(out.bound, bound, rtol=1e-10, atol=1e-9)
    direct = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
    for a, b in zip(grads, direct, strict=True):
        if b is None:
            assert a is None or not a.abs().any()
        else:
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-9)


def _loss_and_grads(model, x, packed):
    w = torch.tensor([0.5, 1.0], dtype=x.dtype)
    out = model(x, w, w, generator=torch.Generator().manual_seed(3), packed=packed)
    return out.loss.detach(), torch.autograd.grad(out.loss, list(model.parameters()))


@pytest.mark.skipif(bool(ext_unavailable_reason()), reason=f"C++ extension not built: {ext_unavailable_reason()}")
@pytest.mark.parametrize("packed", [True, False])
def test_fused_op_and_plain_torch_give_the_same_loss_and_gradients(backend, packed):
    torch.manual_seed(4)
    model = MFCVAE(tiny_config(n_clusters=[4, 6], z_dims=[5, 3], hidden=[12, 8])).double()  # fp64: tight checks
    x = torch.rand((9, 1, 4, 4), dtype=torch.float64)
    backend("torch")
    ref_loss, ref_grads = _loss_and_grads(model, x, packed)
    backend("ext")
    loss, grads = _loss_and_grads(model, x, packed)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=1e-9)
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


def test_one_packed_call_equals_one_call_per_facet(backend):
    backend("torch")
    torch.manual_seed(5)
    priors = FacetPriors(tiny_config(n_clusters=[4, 6, 2], z_dims=[5, 3, 1], hidden=[4, 4, 4], n_facets=3)).double()
    zs = [torch.randn(7, d, dtype=torch.float64, requires_grad=True) for d in (5, 3, 1)]
    packed, resp_packed = facet_log_densities(zs, priors, with_posterior=True, packed=True)
    single, resp_single = facet_log_densities(zs, priors, with_posterior=True, packed=False)
    for a, b in zip(packed, single, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-10)
    for a, b in zip(resp_packed, resp_single, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    params = [*zs, *priors.parameters()]
    ga = torch.autograd.grad(sum(t.sum() for t in packed), params)
    gb = torch.autograd.grad(sum(t.sum() for t in single), params)
    for a, b in zip(ga, gb, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_progressive_schedule_weights():
    # two facets: the deep one (index 1) always on; the shallow one 0 for 10 steps, then up over 4 steps
    assert [facet_weights(t, 2, 10, 4) for t in (0, 9, 10, 11, 12, 13, 14, 100)] == [
        [0.0, 1.0], [0.0, 1.0], [0.0, 1.0], [0.25, 1.0], [0.5, 1.0], [0.75, 1.0], [1.0, 1.0], [1.0, 1.0]]
    # three facets: facet 1 fades over [10, 14), trains with facet 2 for 10 steps, then facet 0 over [24, 28)
    assert facet_weights(12, 3, 10, 4) == [0.0, 0.5, 1.0]
    assert facet_weights(23, 3, 10, 4) == [0.0, 1.0, 1.0]
    assert facet_weights(26, 3, 10, 4) == [0.5, 1.0, 1.0]
    assert schedule_end(3, 10, 4) == 28 and facet_weights(28, 3, 10, 4) == [1.0, 1.0, 1.0]
    assert facet_weights(10, 2, 10, 0) == [1.0, 1.0] and facet_weights(9, 2, 10, 0) == [0.0, 1.0]
    recipe = ProgressiveRecipe(tiny_config(solo_steps=10, fade_steps=4))
    assert recipe.scalars(12) == {"alpha": (0.5, 1.0), "kl_weight": (0.5, 1.0)}


def test_a_facet_out_of_the_schedule_gets_no_gradient(backend):
    backend("torch")
    torch.manual_seed(6)
    model = MFCVAE(tiny_config())
    out = model(torch.rand((4, 1, 4, 4)), torch.tensor([0.0, 1.0]), torch.tensor([0.0, 1.0]))
    out.loss.backward()
    assert not model.encoder.heads[0].weight.grad.abs().any() and not model.priors.loc[0].grad.abs().any()
    assert model.encoder.heads[1].weight.grad.abs().any() and model.priors.loc[1].grad.abs().any()


def test_facet_scores_per_factor():
    rng = np.random.default_rng(0)
    labels = np.stack([rng.integers(0, 3, 600), rng.integers(0, 4, 600)], axis=1)
    perm = np.array([2, 0, 1])
    table = facet_table([perm[labels[:, 0]], labels[:, 1] * 2 + rng.integers(0, 2, 600)], labels,
                        ["shape", "hue"], [3, 8])
    assert [row["facet"] for row in table] == [0, 1] and table[1]["n_clusters"] == 8
    s0, s1 = table[0]["scores"], table[1]["scores"]
    assert s0["shape"]["nmi"] == pytest.approx(1.0) and s0["shape"]["acc"] == pytest.approx(1.0)
    assert s0["hue"]["nmi"] < 0.02
    # facet 1 splits every hue into two clusters: many-to-one ACC 1, Hungarian (one cluster per label) about 1/2
    assert s1["hue"]["acc_many_to_one"] == pytest.approx(1.0) and 0.4 < s1["hue"]["acc"] < 0.6


def test_many_to_one_accuracy_against_a_loop():
    rng = np.random.default_rng(1)
    labels, clusters = rng.integers(0, 3, 200), rng.integers(0, 5, 200)
    hits = sum(max(np.sum((clusters == c) & (labels == y)) for y in range(3)) for c in range(5))
    assert many_to_one_acc(labels, clusters) == pytest.approx(hits / 200)
