"""The CMVAE: per-modality encoders/decoders, a learned mixture prior over K clusters on the shared z,
fixed private priors p(w_m), learnable auxiliary priors r_m(w_m), and a mixture-of-experts posterior.

Tensors of several modalities are stacked along a leading M axis: images [M, B, C, H, W], posterior
parameters [M, B, D], samples [M, S, B, D] (source modality, importance sample, datapoint).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cmvae_engine import kernels
from cmvae_engine.cmvae.config import ModelConfig
from cmvae_engine.cmvae.distributions import fixed_scale, rsample, scale_from_raw
from cmvae_engine.cmvae.grouped_encoders import GroupedEncoders
from cmvae_engine.cmvae.networks import Decoder, Encoder


@dataclass
class Posterior:
    """Per-modality posterior parameters, each [M, B, D]."""

    z_loc: torch.Tensor
    z_scale: torch.Tensor
    w_loc: torch.Tensor
    w_scale: torch.Tensor


@dataclass
class Latents:
    """Reparameterised draws: z and w from each source's posterior [M, S, B, D]; w_aux[m, n] ~ r_n
    [M, M, S, B, Dw] replaces w_n when modality n is reconstructed from source m != n."""

    z: torch.Tensor
    w: torch.Tensor
    w_aux: torch.Tensor


class CMVAE(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        c = config
        self.encoders = nn.ModuleList(
            Encoder(c.z_dim, c.w_dim, c.width, c.image_channels) for _ in range(c.n_modalities)
        )
        self.decoders = nn.ModuleList(
            Decoder(c.z_dim, c.w_dim, c.width, c.image_channels) for _ in range(c.n_modalities)
        )
        # The 2M towers as one grouped computation over the encoders' own parameters; outside the module tree
        # (object.__setattr__), so state_dict and checkpoints are the same with either path.
        object.__setattr__(self, "grouped_encoders", GroupedEncoders(self.encoders))
        k = c.n_clusters
        self.prior_logits = nn.Parameter(torch.zeros(k))
        if c.kind == "mmvaeplus":
            # MMVAE+: a single fixed zero-mean component, nothing to learn in p(z).
            self.prior_logits.requires_grad_(False)
            self.register_buffer("prior_loc", torch.zeros(k, c.z_dim))
        else:
            self.prior_loc = nn.Parameter(torch.empty(k, c.z_dim).uniform_(-c.prior_mean_init, c.prior_mean_init))
        self.prior_raw_scale = nn.Parameter(torch.zeros(k, c.z_dim), requires_grad=c.learn_scales)
        # r_m(w_m): zero mean, learnable scale; raw 0 gives scale 1 (Laplace).
        self.aux_raw_scale = nn.Parameter(torch.zeros(c.n_modalities, c.w_dim))
        # Pruned clusters are masked out (zero prior mass); all active after training.
        self.register_buffer("cluster_active", torch.ones(k, dtype=torch.bool))

    # ----- priors -----------------------------------------------------------------------------------
    def prior_params(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(log_pi [K], loc [K, Dz], scale [K, Dz]) of the mixture prior, pruned clusters at -inf."""
        logits = self.prior_logits.masked_fill(~self.cluster_active, float("-inf"))
        return F.log_softmax(logits, dim=-1), self.prior_loc, scale_from_raw(self.prior_raw_scale, self.config.family)

    def aux_scale(self) -> torch.Tensor:
        """[M, Dw] scales of the auxiliary priors r_m."""
        return scale_from_raw(self.aux_raw_scale, self.config.family)

    @property
    def w_prior_scale(self) -> float:
        return fixed_scale(self.config.family, self.config.w_dim)

    # ----- inference ----------------------------------------------------------------------------------
    # One grouped computation for all 2M encoder towers instead of 2M calls; set by the engine's step options.
    batch_encoders: bool = False

    def encode(self, x: torch.Tensor, batched: bool | None = None) -> Posterior:
        """x [M, B, C, H, W] float in [0, 1] -> per-modality posterior parameters.

        batched (default: the `batch_encoders` attribute) runs the towers as one grouped computation
        (cmvae/grouped_encoders.py); the default calls each modality's encoder in turn. Same values to rounding.
        """
        batched = self.batch_encoders if batched is None else batched
        if batched and isinstance(x, torch.Tensor):
            z_loc, z_raw, w_loc, w_raw = self.grouped_encoders(x)
        else:
            outs = [enc(x[m]) for m, enc in enumerate(self.encoders)]
            z_loc, z_raw, w_loc, w_raw = (torch.stack(t) for t in zip(*outs, strict=True))
        fam = self.config.family
        return Posterior(z_loc, scale_from_raw(z_raw, fam), w_loc, scale_from_raw(w_raw, fam))

    def sample_latents(self, post: Posterior, n_samples: int, generator: torch.Generator | None = None) -> Latents:
        fam = self.config.family
        m, b, dw = post.w_loc.shape
        z = rsample(post.z_loc[:, None].expand(-1, n_samples, -1, -1), post.z_scale[:, None], fam,
                    generator=generator)
        w = rsample(post.w_loc[:, None].expand(-1, n_samples, -1, -1), post.w_scale[:, None], fam,
                    generator=generator)
        aux_loc = post.w_loc.new_zeros(m, m, n_samples, b, dw)
        w_aux = rsample(aux_loc, self.aux_scale()[None, :, None, None, :], fam, generator=generator)
        return Latents(z, w, w_aux)

    # ----- generation -----------------------------------------------------------------------------------
    def decode_target(self, n: int, z: torch.Tensor, w_self: torch.Tensor, w_aux: torch.Tensor) -> torch.Tensor:
        """Decode modality n from every source in ONE decoder call.

        z [M, S, B, Dz] (one z per source), w_self [S, B, Dw] (modality n's own w, used when source == n),
        w_aux [M, S, B, Dw] (r_n draws, used for the other sources) -> [M, S, B, C, H, W].
        """
        n_src = z.shape[0]
        is_self = torch.arange(n_src, device=z.device) == n
        w = torch.where(is_self[:, None, None, None], w_self[None], w_aux)
        out = self.decoders[n](torch.cat([w, z], dim=-1).flatten(0, -2))
        return out.view(*z.shape[:-1], *out.shape[1:])

    # M*M decoder calls per step (as the reference) instead of M batched ones; set by the engine's baseline.
    decode_per_pair: bool = False

    def decode_all(self, lat: Latents, per_pair: bool | None = None) -> list[torch.Tensor]:
        """Self and cross reconstructions: entry n is modality n decoded from every source [M, S, B, C, H, W].

        per_pair (default: the `decode_per_pair` attribute) makes one decoder call per (source, target) pair,
        the reference's way; the default batches all sources of a target into one call. Same values.
        """
        per_pair = self.decode_per_pair if per_pair is None else per_pair
        n_mod = self.config.n_modalities
        if not per_pair:
            return [self.decode_target(n, lat.z, lat.w[n], lat.w_aux[:, n]) for n in range(n_mod)]
        return [
            torch.stack([self.decode_pair(n, lat.z[m], lat.w[n] if m == n else lat.w_aux[m, n]) for m in range(n_mod)])
            for n in range(n_mod)
        ]

    def decode_pair(self, n: int, z: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """Decode modality n from z [..., Dz] and w [..., Dw] -> [..., C, H, W]."""
        out = self.decoders[n](torch.cat([w, z], dim=-1).flatten(0, -2))
        return out.view(*z.shape[:-1], *out.shape[1:])

    def _sample_w_prior(self, shape: tuple[int, ...], like: torch.Tensor,
                        generator: torch.Generator | None) -> torch.Tensor:
        loc = like.new_zeros(*shape, self.config.w_dim)
        return rsample(loc, torch.full_like(loc, self.w_prior_scale), self.config.family, generator=generator)

    @torch.no_grad()
    def prior_draw(self, n: int, cluster: int | None = None, generator: torch.Generator | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """n draws from the generative model's latents: c ~ Cat(pi) (or the given active cluster), z ~ p(z|c)
        [n, Dz], w_m ~ p(w_m) [M, n, Dw]."""
        log_pi, loc, scale = self.prior_params()
        if cluster is None:
            c = torch.multinomial(log_pi.exp(), n, replacement=True, generator=generator)
        else:
            if not 0 <= cluster < self.config.n_clusters or not bool(self.cluster_active[cluster]):
                raise ValueError(f"cluster {cluster} is not an active cluster of this model")
            c = torch.full((n,), cluster, dtype=torch.long, device=loc.device)
        z = rsample(loc[c], scale[c], self.config.family, generator=generator)
        return z, self._sample_w_prior((self.config.n_modalities, n), z, generator)

    def generate(self, n: int, cluster: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Unconditional samples [M, n, C, H, W] in [0, 1]: c ~ Cat(pi) (or the given cluster),
        z ~ p(z|c), w_m ~ p(w_m)."""
        z, w = self.prior_draw(n, cluster, generator)
        return torch.stack([self.decode_pair(m, z, w[m]) for m in range(self.config.n_modalities)]).clamp(0, 1)

    @torch.no_grad()
    def generate_conditional(self, x: torch.Tensor, source: int, generator: torch.Generator | None = None,
                             own_w: bool = False) -> torch.Tensor:
        """Encode modality `source` (x [B, C, H, W]), decode every modality from one draw z ~ q_s(z|x) with w
        from the standard prior -> [M, B, C, H, W] in [0, 1]. With `own_w` the source modality itself is decoded
        with its own w ~ q_s(w|x) instead (a self-reconstruction: the diagonal of the reference's self- and
        cross-modal generation, which coherence and FID use)."""
        z, w = self.conditional_draw(x, source, generator, own_w)
        return torch.stack([self.decode_pair(m, z, w[m]) for m in range(self.config.n_modalities)]).clamp(0, 1)

    def conditional_draw(self, x: torch.Tensor, source: int, generator: torch.Generator | None = None,
                         own_w: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """The latents of generation conditioned on modality `source` (x: its batch of B): z ~ q_s(z|x) [B, Dz] and
        w_m ~ p(w_m) [M, B, Dw], with w_s ~ q_s(w|x) instead when `own_w`."""
        z_loc, z_raw, w_loc, w_raw = self.encoders[source](x)
        fam = self.config.family
        z = rsample(z_loc, scale_from_raw(z_raw, fam), fam, generator=generator)
        w = self._sample_w_prior((self.config.n_modalities, x.shape[0]), z, generator)
        if own_w:
            w[source] = rsample(w_loc, scale_from_raw(w_raw, fam), fam, generator=generator)
        return z, w

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Self-reconstructions from the posterior locations -> [M, B, C, H, W] in [0, 1]."""
        post = self.encode(x)
        return torch.stack(
            [self.decode_pair(m, post.z_loc[m], post.w_loc[m]) for m in range(self.config.n_modalities)]
        ).clamp(0, 1)

    # ----- clustering ---------------------------------------------------------------------------------
    def cluster_posterior(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """p(c|z) for z [..., Dz] -> (log p(z) [...], responsibilities [..., K], entropy [...])."""
        log_pi, loc, scale = self.prior_params()
        flat = z.reshape(-1, z.shape[-1])
        logp, resp, ent = kernels.mixture_logpdf(flat, loc, scale, log_pi, self.config.family, with_posterior=True)
        lead = z.shape[:-1]
        return logp.view(lead), resp.view(*lead, -1), ent.view(lead)
