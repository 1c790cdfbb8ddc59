"""The objective against an independent, straightforward computation with torch.distributions."""

import math

import pytest
import torch
from torch import distributions as D

from cmvae_engine.cmvae import CMVAE, ModelConfig, loss_fn
from cmvae_engine.cmvae.objectives import log_weights


@pytest.fixture(autouse=True)
def float64_default():
    """Exact comparisons in float64; restored afterwards so other modules keep float32."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def small_model(m, k=5, family="laplace", seed=0, **kw):
    torch.manual_seed(seed)
    cfg = ModelConfig(n_modalities=m, n_clusters=k, z_dim=6, w_dim=4, width=0.0625, family=family, **kw)
    model = CMVAE(cfg).double()
    # Spread the prior and the aux scales so every term matters.
    with torch.no_grad():
        model.prior_logits.normal_()
        model.aux_raw_scale.normal_(0, 0.3)
    return model


def dist(family, loc, scale):
    return D.Laplace(loc, scale) if family == "laplace" else D.Normal(loc, scale)


def independent_lw(model, x, post, lat, beta):
    """lw[m, s, b] from the definition: per-pair decoder calls, per-modality distribution objects,
    and the reference's expectation over p(c|z) written out."""
    cfg = model.config
    fam = cfg.family
    M, S, B, _ = lat.z.shape
    logits = model.prior_logits
    log_pi = torch.log_softmax(logits, -1)
    loc = model.prior_loc
    scale = torch.softmax(model.prior_raw_scale, -1) * cfg.z_dim if fam == "laplace" else \
        torch.nn.functional.softplus(model.prior_raw_scale)
    w_prior_scale = 1.0 if fam == "laplace" else math.log(2.0)
    aux_scale = torch.softmax(model.aux_raw_scale, -1) * cfg.w_dim if fam == "laplace" else \
        torch.nn.functional.softplus(model.aux_raw_scale)
    lw = torch.empty(M, S, B, dtype=x.dtype)
    for m in range(M):
        for s in range(S):
            z = lat.z[m, s]  # [B, Dz]
            ll = 0.0
            for n in range(M):
                w = lat.w[m, s] if n == m else lat.w_aux[m, n, s]
                if n != m:
                    # the aux draw must be a draw from r_n: check it is finite under r_n
                    assert torch.isfinite(dist(fam, torch.zeros_like(w), aux_scale[n]).log_prob(w)).all()
                mean = model.decoders[n](torch.cat([w, z], -1))
                lik = D.Laplace(mean, torch.full_like(mean, cfg.likelihood_scale))
                ll = ll + lik.log_prob(x[n]).sum((-1, -2, -3))
            # sum_c p(c|z) (log pi_c + log p(z|c) - log p(c|z))
            comp = torch.stack([dist(fam, loc[c], scale[c]).log_prob(z).sum(-1) for c in range(cfg.n_clusters)], -1)
            joint = comp + log_pi
            post_c = torch.softmax(joint, -1)
            cluster_term = (post_c * (joint - torch.log(post_c))).sum(-1)
            lpw = dist(fam, torch.zeros_like(lat.w[m, s]), torch.full_like(lat.w[m, s], w_prior_scale)) \
                .log_prob(lat.w[m, s]).sum(-1)
            experts = torch.stack([dist(fam, post.z_loc[e], post.z_scale[e]).log_prob(z).sum(-1) for e in range(M)])
            lqz = torch.logsumexp(experts, 0) - math.log(M)
            lqw = dist(fam, post.w_loc[m], post.w_scale[m]).log_prob(lat.w[m, s]).sum(-1)
            lw[m, s] = ll + beta * (cluster_term + lpw - lqz - lqw)
    return lw


@pytest.mark.parametrize("M", [2, 3, 5])
@pytest.mark.parametrize("S", [1, 3])
@pytest.mark.parametrize("family", ["laplace", "normal"])
def test_log_weights_match_independent_computation(M, S, family):
    model = small_model(M, family=family)
    x = torch.rand(M, 4, 3, 28, 28)
    post = model.encode(x)
    lat = model.sample_latents(post, S, torch.Generator().manual_seed(0))
    beta = 2.5
    ours = log_weights(model, x, post, lat, beta).lw
    ref = independent_lw(model, x, post, lat, beta)
    torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-7)


@pytest.mark.parametrize("S", [1, 3])
def test_iwae_bound_is_mean_over_modalities_of_logmeanexp(S):
    model = small_model(3)
    x = torch.rand(3, 5, 3, 28, 28)
    out = loss_fn(model, x, objective="iwae", n_samples=S, beta=1.5, generator=torch.Generator().manual_seed(3))
    post = model.encode(x)
    lat = model.sample_latents(post, S, torch.Generator().manual_seed(3))
    lw = independent_lw(model, x, post, lat, 1.5)
    expected = (torch.logsumexp(lw, 1) - math.log(S)).mean(0)
    torch.testing.assert_close(out.bound, expected, rtol=1e-9, atol=1e-7)
    torch.testing.assert_close(out.loss, -expected.sum(), rtol=1e-9, atol=1e-7)


def test_logsumexp_identity_value_and_gradient():
    """sum_c p(c|z)(log pi_c + log p(z|c) - log p(c|z)) == logsumexp_c(log pi_c + log p(z|c)), gradients too."""
    torch.manual_seed(0)
    z = torch.randn(7, 4, requires_grad=True)
    loc = torch.randn(5, 4, requires_grad=True)
    logits = torch.randn(5, requires_grad=True)
    joint = D.Laplace(loc, torch.ones_like(loc)).log_prob(z[:, None]).sum(-1) + torch.log_softmax(logits, -1)
    post = torch.softmax(joint, -1)
    expectation = (post * (joint - torch.log(post))).sum(-1)
    lse = torch.logsumexp(joint, -1)
    torch.testing.assert_close(expectation, lse)
    g1 = torch.autograd.grad(expectation.sum(), (z, loc, logits), retain_graph=True)
    g2 = torch.autograd.grad(lse.sum(), (z, loc, logits))
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(a, b)


def _grads(model, loss):
    params = [p for p in model.parameters() if p.requires_grad]
    return dict(zip([n for n, p in model.named_parameters() if p.requires_grad],
                    torch.autograd.grad(loss, params, allow_unused=True), strict=True))


@pytest.mark.parametrize("S", [1, 4])
def test_dreg_gradient_matches_hand_built_surrogate(S):
    M, beta = 3, 2.0
    model = small_model(M)
    x = torch.rand(M, 3, 3, 28, 28)
    ours = _grads(model, loss_fn(model, x, objective="dreg", n_samples=S, beta=beta,
                                 generator=torch.Generator().manual_seed(7)).loss)

    # Hand-built: (a) decoder/prior/aux parameters: -mean_m sum_s w~ lw with the encoder's samples detached;
    # (b) encoder parameters: the path gradient dlw/dz, dlw/dw (posterior parameters detached inside log q)
    #     pushed through the samples with weight w~^2.
    post = model.encode(x)
    lat = model.sample_latents(post, S, torch.Generator().manual_seed(7))
    z_leaf = lat.z.detach().requires_grad_()
    w_leaf = lat.w.detach().requires_grad_()
    det = type(post)(*(t.detach() for t in (post.z_loc, post.z_scale, post.w_loc, post.w_scale)))
    lw = log_weights(model, x, det, type(lat)(z_leaf, w_leaf, lat.w_aux), beta, detach_q=True).lw
    wt = torch.softmax(lw.detach(), 1)
    part_a = -(wt * lw).sum(1).mean(0).sum()
    gz, gw = torch.autograd.grad(-(wt * lw).sum(1).mean(0).sum(), (z_leaf, w_leaf), retain_graph=True)
    part_b = ((gz * wt[..., None]) * lat.z).sum() + ((gw * wt[..., None]) * lat.w).sum()
    expected = _grads(model, part_a + part_b)
    for name, g in ours.items():
        e = expected[name]
        if g is None:
            assert e is None or torch.count_nonzero(e) == 0, name
            continue
        torch.testing.assert_close(g, e, rtol=1e-7, atol=1e-9, msg=name)


def test_dreg_differs_from_iwae_on_encoders_only_in_path_terms():
    """With S=1, DReG and IWAE give the same decoder gradients but different encoder gradients."""
    model = small_model(2)
    x = torch.rand(2, 3, 3, 28, 28)
    gi = _grads(model, loss_fn(model, x, objective="iwae", generator=torch.Generator().manual_seed(1)).loss)
    gd = _grads(model, loss_fn(model, x, objective="dreg", generator=torch.Generator().manual_seed(1)).loss)
    for name in gi:
        if name.startswith("decoders") or name.startswith("prior"):
            torch.testing.assert_close(gi[name], gd[name], msg=name)
    enc = [n for n in gi if n.startswith("encoders") and n.endswith("raw_scale.weight")]
    assert any(not torch.allclose(gi[n], gd[n]) for n in enc)


def test_one_decoder_call_per_target_equals_per_pair_calls():
    model = small_model(4)
    x = torch.rand(4, 3, 3, 28, 28)
    post = model.encode(x)
    lat = model.sample_latents(post, 2, torch.Generator().manual_seed(0))
    batched = model.decode_all(lat)
    for n in range(4):
        for m in range(4):
            w = lat.w[n] if m == n else lat.w_aux[m, n]
            single = model.decoders[n](torch.cat([w, lat.z[m]], -1).flatten(0, 1)).view(2, 3, 3, 28, 28)
            torch.testing.assert_close(batched[n][m], single)


def test_generation_shapes_and_ranges():
    model = small_model(3, k=4)
    g = torch.Generator().manual_seed(0)
    samples = model.generate(6, generator=g)
    assert samples.shape == (3, 6, 3, 28, 28)
    assert samples.min() >= 0 and samples.max() <= 1
    assert model.generate(2, cluster=1, generator=g).shape == (3, 2, 3, 28, 28)
    cond = model.generate_conditional(torch.rand(5, 3, 28, 28), source=2, generator=g)
    assert cond.shape == (3, 5, 3, 28, 28)
    assert cond.min() >= 0 and cond.max() <= 1
    with pytest.raises(ValueError, match="cluster 9"):
        model.generate(2, cluster=9)
    model.cluster_active[1] = False
    with pytest.raises(ValueError, match="cluster 1"):
        model.generate(2, cluster=1)


def test_generation_respects_pruned_clusters():
    model = small_model(2, k=4)
    model.cluster_active[:] = torch.tensor([False, True, False, False])
    log_pi, loc, scale = model.prior_params()
    assert torch.isinf(log_pi[[0, 2, 3]]).all() and log_pi[1] == 0
    _, resp, ent = model.cluster_posterior(torch.randn(10, 6))
    assert (resp[:, [0, 2, 3]] == 0).all() and torch.allclose(resp[:, 1], torch.ones(10))
    assert torch.isfinite(ent).all()


def test_mmvaeplus_is_one_fixed_zero_mean_cluster():
    torch.manual_seed(0)
    model = CMVAE(ModelConfig(kind="mmvaeplus", n_modalities=2, n_clusters=40, z_dim=4, w_dim=4, width=0.0625))
    assert model.config.n_clusters == 1
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any(n.startswith("prior") for n in trainable)
    assert torch.count_nonzero(model.prior_loc) == 0
