"""CMVAE over heterogeneous modalities: each modality has its own network family (networks_cub.py: 28x28 PolyMNIST
ResNet, 32/64 CUBICC ResNet, caption CNN) and its own likelihood (image Laplace or Normal with a fixed scale, caption
categorical), each scaled by its own llik_scaling. Everything else (priors, posterior, objectives, clustering,
pruning) is the CMVAE's.

Inputs are `Modalities` (cmvae/modalities.py): images float [B, C, H, W] in [0, 1], captions int64 token ids [B, L].
Decoded captions are logits [.., L, V]; `generate` and friends return token ids (the most likely word per position).

BatchNorm: the caption networks normalise over the rows of each call in training mode, so decoding all source
modalities of a caption target in ONE call (the default batching of decode_target, exact for the BatchNorm-free
image networks) would change the statistics each row is normalised with. Decoders with BatchNorm are therefore
called once per source modality, on that source's S x B rows: the reference's per-(source, target) call, so the
statistics are the reference's. Image targets stay batched across sources. In eval mode BatchNorm uses its running
statistics and the two ways agree (tests/test_hetero.py checks both facts).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from cmvae_engine import kernels
from cmvae_engine.cmvae.config import ModelConfig
from cmvae_engine.cmvae.modalities import Modalities
from cmvae_engine.cmvae.model import CMVAE
from cmvae_engine.cmvae.networks_cub import build_decoder, build_encoder, has_batchnorm

TEXT_LLIK_SCALING = 5.0
"""The reference's caption llik scaling (CUBICC `--llik_scaling_sent`)."""


def is_heterogeneous(config: ModelConfig) -> bool:
    return getattr(config, "modalities", None) is not None


class HeteroCMVAE(CMVAE):
    def __init__(self, config: ModelConfig):
        specs = config.modalities
        if not specs or len(specs) != config.n_modalities:
            raise ValueError(f"model.modalities must list one spec per modality ({config.n_modalities})")
        # The CMVAE builds its priors; its (28x28) networks are not built: a shell config with no modalities.
        shell = copy.copy(config)
        shell.n_modalities = 0
        super().__init__(shell)
        self.config = config
        c = config
        self.encoders = nn.ModuleList(build_encoder(s, c.z_dim, c.w_dim, c.width) for s in specs)
        self.decoders = nn.ModuleList(build_decoder(s, c.z_dim, c.w_dim, c.width) for s in specs)
        self.aux_raw_scale = nn.Parameter(torch.zeros(c.n_modalities, c.w_dim))
        self._per_source = [has_batchnorm(d) for d in self.decoders]

    @property
    def specs(self) -> list[dict]:
        return self.config.modalities

    def is_text(self, m: int) -> bool:
        return self.specs[m]["kind"] == "text"

    # ----- decoding -------------------------------------------------------------------------------------------
    def decode_target(self, n: int, z: torch.Tensor, w_self: torch.Tensor, w_aux: torch.Tensor) -> torch.Tensor:
        if not self._per_source[n]:
            return super().decode_target(n, z, w_self, w_aux)
        # BatchNorm: one call per source (see the module docstring)
        return torch.stack([self.decode_pair(n, z[m], w_self if m == n else w_aux[m]) for m in range(z.shape[0])])

    def reconstruction_loglik(self, recons: list[torch.Tensor], x: Modalities) -> torch.Tensor:
        """[M, S, B]: sum over target modalities n of llik_scaling_n * log p_n(x_n | decoded from each source)."""
        total = 0
        for n, spec in enumerate(self.specs):
            if spec["kind"] == "text":
                ll = caption_loglik(recons[n], x[n])
            else:
                ll = kernels.image_loglik(recons[n], x[n], spec["likelihood_scale"], spec["likelihood"])
            total = total + ll * spec["llik_scaling"]
        return total

    def output(self, m: int, raw: torch.Tensor) -> torch.Tensor:
        """A decoder's output as data: images clamped to [0, 1], captions the most likely token per position."""
        return raw.argmax(-1) if self.is_text(m) else raw.clamp(0, 1)

    # ----- generation (Modalities out) ------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, n: int, cluster: int | None = None, generator: torch.Generator | None = None) -> Modalities:
        z, w = self.prior_draw(n, cluster, generator)
        return Modalities([self.output(m, self.decode_pair(m, z, w[m])) for m in range(self.config.n_modalities)])

    @torch.no_grad()
    def generate_conditional(self, x: torch.Tensor, source: int,
                             generator: torch.Generator | None = None, own_w: bool = False) -> Modalities:
        z, w = self.conditional_draw(x, source, generator, own_w)  # as CMVAE.generate_conditional
        return Modalities([self.output(m, self.decode_pair(m, z, w[m])) for m in range(self.config.n_modalities)])

    @torch.no_grad()
    def reconstruct(self, x: Modalities) -> Modalities:
        post = self.encode(x)
        return Modalities([self.output(m, self.decode_pair(m, post.z_loc[m], post.w_loc[m]))
                           for m in range(self.config.n_modalities)])


def caption_loglik(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """sum over positions of log softmax(logits)[token]: logits [..., B, L, V], tokens [B, L] -> [..., B].

    The reference's OneHotCategorical(probs=softmax(logits)).log_prob(one-hot caption), summed over all L positions
    (padding included, as the reference), computed from the logits (the same value, without the log of a softmax)."""
    logits = logits.float()
    idx = tokens.long().expand(*logits.shape[:-1])[..., None]
    return (logits.gather(-1, idx).squeeze(-1) - logits.logsumexp(-1)).sum(-1)
