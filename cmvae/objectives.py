"""The CMVAE objectives: IWAE (reference behaviour; S=1 is the ELBO) and a correct DReG estimator.

Per source modality m and importance sample s:

    lw[m, s] = log p_m(x_m | z, w_m) + sum_{n != m} log p_n(x_n | z, w~_n)
             + beta * (log p(z) + log p(w_m) - log q(z | X) - log q_m(w_m | x_m))

where log p(z) = logsumexp_c (log pi_c + log p(z | c)) equals the reference's expectation over p(c|z)
(the identity holds in value and gradient). The bound is sum_batch mean_m logmeanexp_s lw.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cmvae_engine import kernels
from cmvae_engine.cmvae import path_weights
from cmvae_engine.cmvae.distributions import log_prob, log_prob_const_scale
from cmvae_engine.cmvae.model import CMVAE, Latents, Posterior

OBJECTIVES = ("iwae", "dreg")


@dataclass
class LogWeights:
    """lw [M, S, B] and its terms (each [M, S, B]) for inspection and tests."""

    lw: torch.Tensor
    loglik: torch.Tensor
    log_pz: torch.Tensor
    log_pw: torch.Tensor
    log_qz: torch.Tensor
    log_qw: torch.Tensor


@dataclass
class LossOutput:
    loss: torch.Tensor
    """Scalar to minimise: minus the batch-summed bound (or DReG surrogate), as the reference."""
    bound: torch.Tensor
    """[B] IWAE bound per datapoint (detached), the number to report."""
    posterior: Posterior | None = None
    """The encoders' posterior parameters of this batch (for terms a training recipe adds)."""


def log_weights(
    model: CMVAE, x: torch.Tensor, post: Posterior, lat: Latents, beta: float, detach_q: bool = False
) -> LogWeights:
    """lw for images x [M, B, C, H, W] in [0, 1], posterior parameters and latent draws.

    detach_q: evaluate log q(z|X) and log q_m(w_m|x_m) with every posterior parameter detached (DReG);
    the samples themselves keep their path gradient.
    """
    cfg = model.config
    fam = cfg.family
    recons = model.decode_all(lat)
    # loglik[m, s, b] = sum over target modalities n of log p_n(x_n | decoded from source m)
    own_likelihoods = getattr(model, "reconstruction_loglik", None)  # heterogeneous modalities (cmvae/hetero.py)
    loglik = own_likelihoods(recons, x) if own_likelihoods is not None else sum(
        kernels.image_loglik(recons[n], x[n], cfg.likelihood_scale, cfg.likelihood) for n in range(cfg.n_modalities)
    ) * cfg.llik_scaling

    log_pi, loc, scale = model.prior_params()
    z = lat.z
    log_pz = kernels.mixture_logpdf(z.reshape(-1, z.shape[-1]), loc, scale, log_pi, fam)[0].view(z.shape[:-1])

    q = Posterior(*(t.detach() for t in (post.z_loc, post.z_scale, post.w_loc, post.w_scale))) if detach_q else post
    log_qz = kernels.moe_logq(z, q.z_loc, q.z_scale, fam)
    log_qw = log_prob(lat.w, q.w_loc[:, None], q.w_scale[:, None], fam).sum(-1)
    log_pw = log_prob_const_scale(lat.w, torch.zeros_like(lat.w), model.w_prior_scale, fam).sum(-1)

    lw = loglik + beta * (log_pz + log_pw - log_qz - log_qw)
    return LogWeights(lw, loglik, log_pz, log_pw, log_qz, log_qw)


def loss_fn(
    model: CMVAE, x: torch.Tensor, *, objective: str = "iwae", n_samples: int = 1, beta: float = 2.5,
    generator: torch.Generator | None = None,
) -> LossOutput:
    """One evaluation of the training objective on a batch x [M, B, C, H, W] in [0, 1]."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    post = model.encode(x)
    lat = model.sample_latents(post, n_samples, generator)
    dreg = objective == "dreg"
    # The path gradient of the encoder's samples carries w~ twice (w~^2) under DReG; with S=1 the weight is 1.
    # The samples are tagged before any use; the weights reach their gradient through `send` below.
    tokens: tuple[torch.Tensor, ...] = ()
    if dreg and n_samples > 1:
        (z, tz), (w, tw) = path_weights.tag(lat.z), path_weights.tag(lat.w)
        lat, tokens = Latents(z, w, lat.w_aux), (tz, tw)
    lwo = log_weights(model, x, post, lat, beta, detach_q=dreg)
    bound, weights, _ = kernels.importance_weights(lwo.lw)
    if not dreg:
        return LossOutput(-bound.sum(), bound.detach(), post)
    surrogate = (weights * lwo.lw).sum(1).mean(0)
    loss = -surrogate.sum()
    if tokens:
        loss = loss + path_weights.send(weights, *tokens)  # + exactly 0
    return LossOutput(loss, bound.detach(), post)
