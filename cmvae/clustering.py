"""Cluster assignment with the VaDE trick: argmax_c p(c | z_m) per modality, majority vote over modalities."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cmvae_engine.cmvae.distributions import rsample, scale_from_raw
from cmvae_engine.cmvae.modalities import Modalities
from cmvae_engine.cmvae.model import CMVAE
from cmvae_engine.cmvae.progress import ProgressFn, batches, report


@dataclass
class SplitLatents:
    """Per-modality posterior draws of z over a split and their cluster posteriors."""

    z: torch.Tensor         # [M, N, Dz]
    log_pz: torch.Tensor    # [M, N]
    resp: torch.Tensor      # [M, N, K]
    entropy: torch.Tensor   # [M, N] in nats


def to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float in [0, 1]; float input (and token ids) pass through; Modalities part by part."""
    if isinstance(x, Modalities):
        return x.map(to_float)
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x


@torch.no_grad()
def encode_split(
    model: CMVAE, images: torch.Tensor, *, batch_size: int = 512, sample: bool = True,
    generator: torch.Generator | None = None, device: torch.device | str | None = None,
    progress: ProgressFn | None = None,
) -> SplitLatents:
    """One encoder pass over images [M, N, C, H, W] (uint8 or float), one z per datapoint and modality.

    sample=True draws z ~ q_m(z|x_m) (the reference's choice); False uses the posterior location.
    `progress`: called with (batches done, batches).
    """
    device = device or next(model.parameters()).device
    zs = []
    total = batches(images.shape[1], batch_size)
    for start in range(0, images.shape[1], batch_size):
        x = to_float(images[:, start:start + batch_size].to(device, non_blocking=True))
        post = model.encode(x)
        z = rsample(post.z_loc, post.z_scale, model.config.family, generator=generator) if sample else post.z_loc
        zs.append(z)
        report(progress, len(zs), total)
    z = torch.cat(zs, dim=1)
    log_pz, resp, ent = model.cluster_posterior(z)
    return SplitLatents(z, log_pz, resp, ent)


@torch.no_grad()
def z_posterior(model: CMVAE, images: torch.Tensor, batch_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """(loc, scale) of q_m(z | x_m), each [M, N, Dz], for uint8 images [M, N, C, H, W] on any device.

    Runs the z towers only: half the encoder's work, and the whole of what clustering needs."""
    device = model.prior_logits.device
    locs, raws = [], []
    for m, enc in enumerate(model.encoders):
        parts = [enc.tower_z(to_float(images[m, s:s + batch_size].to(device, non_blocking=True)))
                 for s in range(0, images.shape[1], batch_size)]
        locs.append(torch.cat([p[0] for p in parts]))
        raws.append(torch.cat([p[1] for p in parts]))
    return torch.stack(locs).float(), scale_from_raw(torch.stack(raws).float(), model.config.family)


def probe_means(model: CMVAE, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Posterior means of z [M, N, Dz] for uint8 images [M, N, C, H, W]."""
    return z_posterior(model, images, batch_size)[0]


def majority_vote(per_modality: torch.Tensor, n_clusters: int) -> torch.Tensor:
    """[M, N] cluster ids -> [N] most frequent id per column, ties to the lowest id (as torch.mode)."""
    counts = torch.zeros(per_modality.shape[1], n_clusters, dtype=torch.long, device=per_modality.device)
    counts.scatter_add_(1, per_modality.t(), torch.ones_like(per_modality.t()))
    return counts.argmax(dim=1)  # argmax returns the first maximum: the lowest id


def assign_by_rule(resp: torch.Tensor, rule: str = "vote") -> tuple[torch.Tensor, torch.Tensor]:
    """resp [M, N, K] -> (assigned cluster [N], confidence max_c mean_m p(c|z_m) [N]).

    `vote`: majority vote over modalities of argmax_c p(c|z_m) (ties to the lowest id); `confidence`: argmax of
    the modality-averaged responsibility."""
    confidence, top = resp.mean(0).max(dim=-1)
    if rule == "confidence":
        return top, confidence
    return majority_vote(resp.argmax(dim=-1), resp.shape[-1]), confidence


def assign_clusters(resp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Responsibilities [M, N, K] -> (per-modality argmax [M, N], majority vote [N])."""
    per_mod = resp.argmax(dim=-1)
    return per_mod, majority_vote(per_mod, resp.shape[-1])
