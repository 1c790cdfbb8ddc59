"""D-CMVAE's diffusion pieces against independent computations: the schedule, the UNet's shapes, the loss
falling, DDIM's determinism and variance, the eq. 8 conditioning draws and the EMA update."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from cmvae_engine.cmvae.config import ModelConfig
from cmvae_engine.cmvae.diffusion.conditioning import reconstructions
from cmvae_engine.cmvae.diffusion.config import DiffusionConfig
from cmvae_engine.cmvae.diffusion.model import DCMVAE
from cmvae_engine.cmvae.diffusion.sampling import ddim_sample, ddim_sigma, ddim_timesteps, ddpm_sample, start_step
from cmvae_engine.cmvae.diffusion.schedule import Schedule
from cmvae_engine.cmvae.diffusion.unet import UNet
from cmvae_engine.cmvae.model import CMVAE


def test_alpha_bar_is_the_product_of_one_minus_beta():
    s = Schedule(1000, 1e-4, 0.02)
    betas = [1e-4 + (0.02 - 1e-4) * i / 999 for i in range(1000)]
    prod, expect = 1.0, []
    for b in betas:
        prod *= 1.0 - b
        expect.append(prod)
    np.testing.assert_allclose(s.betas.double().numpy(), betas, rtol=1e-6)
    np.testing.assert_allclose(s.alphas_bar.double().numpy(), expect, rtol=1e-5, atol=1e-9)
    assert s.alphas_bar[-1] < 1e-4  # the last step is almost pure noise


def test_posterior_is_the_product_of_the_two_gaussians():
    """q(x_{t-1} | x_t, x_0) ∝ N(x_t; sqrt(a_t) x_{t-1}, b_t) N(x_{t-1}; sqrt(abar_{t-1}) x_0, 1 - abar_{t-1}):
    completing the square gives precision a_t / b_t + 1 / (1 - abar_{t-1})."""
    s = Schedule(200, 1e-4, 0.05)
    g = torch.Generator().manual_seed(0)
    x0, xt = torch.randn(7, 1, 2, 2, generator=g), torch.randn(7, 1, 2, 2, generator=g)
    t = torch.tensor([1, 2, 10, 50, 100, 150, 199])
    mean, var = s.posterior(x0, xt, t)
    for i, ti in enumerate(t.tolist()):
        b = (1e-4 + (0.05 - 1e-4) * ti / 199)
        abar_prev = math.prod(1 - (1e-4 + (0.05 - 1e-4) * j / 199) for j in range(ti))
        prec = (1 - b) / b + 1 / (1 - abar_prev)
        m = (math.sqrt(1 - b) / b * xt[i] + math.sqrt(abar_prev) / (1 - abar_prev) * x0[i]) / prec
        torch.testing.assert_close(var[i].flatten(), torch.tensor([1 / prec]), rtol=1e-4, atol=0)
        torch.testing.assert_close(mean[i], m, rtol=1e-4, atol=1e-5)
    mean0, var0 = s.posterior(x0[:1], xt[:1], torch.tensor([0]))  # the last step returns x_0 itself
    torch.testing.assert_close(mean0, x0[:1])
    assert float(var0) == 0.0


def test_q_sample_has_the_marginal_of_the_chained_steps():
    """Chaining x_t = sqrt(1 - b_t) x_{t-1} + sqrt(b_t) e_t from x_0 gives the closed form's mean and variance."""
    s = Schedule(50, 1e-3, 0.2)
    g = torch.Generator().manual_seed(1)
    x0 = torch.full((20000, 1, 1, 1), 0.7)
    x = x0.clone()
    for t in range(30):
        x = (1 - s.betas[t]).sqrt() * x + s.betas[t].sqrt() * torch.randn(x.shape, generator=g)
    closed = s.q_sample(x0, torch.full((20000,), 29), torch.randn(x.shape, generator=g))
    assert abs(float(x.mean() - closed.mean())) < 0.03 and abs(float(x.var() / closed.var()) - 1) < 0.05
    assert abs(float(x.mean()) - 0.7 * float(s.sqrt_ab[29])) < 0.02


@pytest.mark.parametrize("size,channels", [(28, 3), (32, 3), (28, 1)])
def test_unet_pads_and_crops_back(size, channels):
    net = UNet(channels, base=8, n_res=1)
    x = torch.randn(2, channels, size, size)
    assert net(x, torch.tensor([0, 999]), x).shape == (2, channels, size, size)


def test_the_output_convolution_starts_at_zero_noise():
    net = UNet(3, base=8, n_res=1)
    x = torch.randn(2, 3, 28, 28)
    assert torch.count_nonzero(net(x, torch.tensor([3, 4]), x)) == 0


def test_the_loss_of_a_tiny_unet_falls_on_a_fixed_batch():
    torch.manual_seed(0)
    s = Schedule(100)
    net = UNet(1, base=8, n_res=1, dropout=0.0)
    g = torch.Generator().manual_seed(2)
    x0 = (torch.rand(8, 1, 28, 28, generator=g) > 0.7).float() * 2 - 1
    t = torch.randint(0, 100, (8,), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)

    def loss():
        return (net(s.q_sample(x0, t, noise), t, x0) - noise).pow(2).mean()

    first = float(loss().detach())
    for _ in range(25):
        opt.zero_grad()
        loss().backward()
        opt.step()
    assert float(loss()) < 0.7 * first


def _eps_model():
    torch.manual_seed(3)
    net = UNet(1, base=8, n_res=1, dropout=0.0).eval()
    for p in net.out.parameters():  # a non-zero output so that the sampler's arithmetic is exercised
        torch.nn.init.normal_(p, std=0.05)
    return net


def test_ddim_with_eta_0_is_deterministic_given_the_noise():
    net, s = _eps_model(), Schedule(100)
    x_hat = torch.rand(3, 1, 28, 28) * 2 - 1
    x_T = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(4))
    a = ddim_sample(net, s, x_hat, steps=10, eta=0.0, x_T=x_T, generator=torch.Generator().manual_seed(5))
    b = ddim_sample(net, s, x_hat, steps=10, eta=0.0, x_T=x_T, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b)
    c = ddim_sample(net, s, x_hat, steps=10, eta=1.0, x_T=x_T, generator=torch.Generator().manual_seed(6))
    assert not torch.equal(a, c)  # with eta = 1 the per-step noise matters
    other = ddim_sample(net, s, x_hat, steps=10, eta=0.0, x_T=torch.randn_like(x_T))
    assert not torch.equal(a, other)
    assert a.abs().max() <= 1.0


def test_ddim_eta_1_on_all_steps_has_ddpm_posterior_variance():
    s = Schedule(100)
    seq = ddim_timesteps(100, 100)
    assert seq == list(range(99, -1, -1))
    for t in (1, 5, 50, 99):
        assert ddim_sigma(s, t, t - 1, 1.0) ** 2 == pytest.approx(float(s.post_var[t]), rel=1e-3)
        assert ddim_sigma(s, t, t - 1, 0.0) == 0.0
    short = ddim_timesteps(10, 1000)
    assert len(short) == 10 and short[-1] == 0 and short[0] == 900


def test_ddpm_sampler_runs_all_steps_in_range():
    net, s = _eps_model(), Schedule(20)
    calls = []

    def fn(x, t, x_hat):
        calls.append(int(t[0]))
        return net(x, t, x_hat)

    out = ddpm_sample(fn, s, torch.zeros(2, 1, 28, 28), generator=torch.Generator().manual_seed(0))
    assert calls == list(range(19, -1, -1)) and out.shape == (2, 1, 28, 28) and out.abs().max() <= 1.0


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_a_partial_chain_starts_from_the_noised_cmvae_sample(sampler):
    """strength < 1: the first denoiser call sees x_hat noised by q(x_t | x_hat) at the chain's first step, and
    no call goes above start_step; strength 1 starts from the noise itself."""
    s = Schedule(100)
    x_hat = torch.rand(2, 1, 28, 28) * 2 - 1
    noise = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    for strength, t_top in ((0.3, 29), (1.0, 99)):
        calls = []

        def fn(x, t, xh, calls=calls):
            calls.append((int(t[0]), x.clone()))
            return torch.zeros_like(x)

        if sampler == "ddim":
            ddim_sample(fn, s, x_hat, steps=10, x_T=noise, strength=strength)
        else:
            ddpm_sample(fn, s, x_hat, x_T=noise, strength=strength, generator=torch.Generator().manual_seed(2))
        t0, x0 = calls[0]
        assert t0 <= t_top and all(t <= t0 for t, _ in calls)
        assert len(calls) == (10 if sampler == "ddim" else t_top + 1)
        ab = math.prod(1.0 - (1e-4 + (0.02 - 1e-4) * i / 99) for i in range(t0 + 1))
        expect = noise if strength == 1 else math.sqrt(ab) * x_hat + math.sqrt(1 - ab) * noise
        torch.testing.assert_close(x0, expect, atol=1e-5, rtol=1e-5)


def test_an_oracle_denoiser_walks_a_partial_chain_back_to_x_hat():
    """With the exact noise of x_0 = x_hat (what a perfect denoiser of a point mass predicts), DDIM at eta 0 returns
    x_hat from any strength."""
    s = Schedule(200)
    x_hat = torch.rand(3, 1, 28, 28) * 1.8 - 0.9

    def oracle(x, t, xh):
        ab = s.alphas_bar[t].view(-1, 1, 1, 1)
        return (x - ab.sqrt() * xh) / (1 - ab).sqrt()

    for strength in (0.05, 0.4, 1.0):
        out = ddim_sample(oracle, s, x_hat, steps=7, strength=strength, generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(out, x_hat, atol=1e-4, rtol=1e-4)


def test_start_step_spans_the_fraction_of_the_chain():
    assert start_step(1.0, 1000) == 999 and start_step(0.5, 1000) == 499 and start_step(1e-6, 1000) == 0
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="--strength"):
            start_step(bad, 1000)


def _cmvae(m=3, family="laplace"):
    torch.manual_seed(0)
    return CMVAE(ModelConfig(n_modalities=m, n_clusters=4, width=0.0625, z_dim=4, w_dim=4, family=family)).eval()


def test_conditioning_is_self_or_cross_at_rate_one_half_and_cross_sources_uniform():
    model, m, b = _cmvae(3), 3, 600
    x = torch.rand(m, b, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    cond = reconstructions(model, x, torch.Generator().manual_seed(2))
    n = m * b
    cross = int(cond.cross.sum())
    assert abs(cross - n / 2) < 4 * math.sqrt(n / 4)  # Binomial(n, 1/2) within 4 sigma
    own = torch.arange(m)[:, None].expand(-1, b)
    assert torch.equal(cond.source[~cond.cross], own[~cond.cross])  # self: z from the target itself
    counts = torch.bincount(cond.source[cond.cross], minlength=m).numpy()
    assert stats.chisquare(counts).pvalue > 1e-3  # cross: n uniform over all M modalities
    assert cond.x_hat.shape == x.shape and float(cond.x_hat.min()) >= 0 and float(cond.x_hat.max()) <= 1


def test_conditioning_decodes_the_drawn_latents():
    """With the posterior scales and r_m shrunk to ~0, a self draw is the decoder of the posterior locations and a
    cross draw the decoder of the source's z location with w = 0 (normal latents: softplus scales can shrink)."""
    model = _cmvae(2, family="normal")
    with torch.no_grad():
        model.aux_raw_scale.fill_(-30.0)
        for enc in model.encoders:
            for tower in (enc.tower_z, enc.tower_w):
                tower.raw_scale.weight.zero_()
                tower.raw_scale.bias.fill_(-30.0)
    x = torch.rand(2, 64, 3, 28, 28, generator=torch.Generator().manual_seed(3))
    cond = reconstructions(model, x, torch.Generator().manual_seed(4))
    post = model.encode(x)
    for m in range(2):
        for i in range(64):
            src = int(cond.source[m, i])
            w = torch.zeros(4) if cond.cross[m, i] else post.w_loc[m, i]
            want = model.decode_pair(m, post.z_loc[src, i][None], w[None])[0].clamp(0, 1)
            torch.testing.assert_close(cond.x_hat[m, i], want, rtol=1e-4, atol=1e-4)


def test_ema_update_follows_the_capped_decay():
    cmvae = ModelConfig(n_modalities=2, n_clusters=2, width=0.0625, z_dim=2, w_dim=2).to_dict()
    model = DCMVAE(DiffusionConfig(cmvae=cmvae, base=8, n_res=1, timesteps=10, ema_decay=0.95))
    p = next(model.denoisers.parameters())
    e = next(model.ema.parameters())
    with torch.no_grad():
        p.add_(1.0)
    before_e, now_p = e.detach().clone(), p.detach().clone()
    model.update_ema()  # first update: decay min(0.95, 1/10) = 0.1
    torch.testing.assert_close(e, 0.1 * before_e + 0.9 * now_p)
    model.ema_updates.fill_(200)  # later: min(0.95, 201/210) = 0.95
    with torch.no_grad():
        p.add_(1.0)
    before_e, now_p = e.detach().clone(), p.detach().clone()
    model.update_ema()
    torch.testing.assert_close(e, 0.95 * before_e + 0.05 * now_p)
    assert int(model.ema_updates) == 201
    assert not any(q.requires_grad for q in model.ema.parameters())
    assert not any(q.requires_grad for q in model.cmvae.parameters())
