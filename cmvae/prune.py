"""Post-hoc cluster selection (DESIGN section 3): prune an over-specified mixture prior down to the cluster
set with the lowest penalised normalised entropy (PNE) on held-out data.

Per step, with the pruned clusters at log pi = -inf and pi renormalised, for every datapoint i and modality m:
responsibilities p(c | z_m^i), their entropy normalised by log K (`initial`: the model's K, as the reference;
`active`: the clusters still active, 0 with one left) and the normalised log-likelihood log p(z_m^i) / Dz.

    PNE = beta * mean_i mean_m H(p(c | z_m^i)) / log K  -  mean_i mean_m log p(z_m^i) / Dz

Assignment of a datapoint: `vote` = majority vote over modalities of argmax_c p(c | z_m) (ties to the lowest
id, as torch.mode); `confidence` = argmax_c of the modality-averaged responsibility mean_m p(c | z_m), the
reference's rule for CUBICC (the papers describe only the vote, which with two modalities ties whenever they
disagree). Either way the datapoint adds its confidence max_c' mean_m p(c' | z_m) to the mass of its assigned
cluster, and the active cluster with the lowest mass is pruned next (ties to the highest id).

Common random numbers: z holds ONE draw per datapoint and modality, reused at every step (the reference draws
afresh at each step). The per-component log-densities log p(z_m | c) are computed once; a step then costs one
logsumexp over K per datapoint and modality. No decoder is called, and the host reads nothing until all
steps are done.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from cmvae_engine.cmvae.clustering import assign_by_rule, to_float
from cmvae_engine.cmvae.distributions import log_prob, rsample
from cmvae_engine.cmvae.metrics import clustering_scores
from cmvae_engine.cmvae.model import CMVAE
from cmvae_engine.cmvae.progress import ProgressFn, batches, report

ENTROPY_NORMS = ("initial", "active")
ASSIGN_RULES = ("vote", "confidence")
# Rows of z per chunk when building log p(z | c): the intermediate is [rows, K, Dz] (16M floats = 64 MB).
_CHUNK_ELEMENTS = 1 << 24


@dataclass
class PruneResult:
    chosen: list[int]
    """Active cluster ids of the chosen set (sorted)."""
    chosen_k: int
    improved: bool
    """False when no pruning beat the unpruned score (then all clusters are kept)."""
    baseline_score: float
    """PNE with nothing pruned."""
    curve: list[dict]
    """One entry per step: {"k", "active", "pne", "entropy", "loglik"} plus "nmi", "ari", "acc", "n_clusters"
    when labels are given."""


def check_options(entropy_norm: str, assign: str) -> None:
    if entropy_norm not in ENTROPY_NORMS:
        raise ValueError(f"--entropy-norm must be one of {ENTROPY_NORMS}, got {entropy_norm!r}")
    _check_assign(assign)


def _check_assign(assign: str) -> None:
    if assign not in ASSIGN_RULES:
        raise ValueError(f"--assign must be one of {ASSIGN_RULES}, got {assign!r}")


@torch.no_grad()
def component_logpdf(model: CMVAE, z: torch.Tensor) -> torch.Tensor:
    """log p(z_m | c) for z [M, N, Dz] -> [M, N, K] (mixture weights not included)."""
    _, loc, scale = model.prior_params()
    flat = z.reshape(-1, z.shape[-1])
    rows = max(1, _CHUNK_ELEMENTS // (loc.numel() or 1))
    out = [log_prob(part[:, None, :], loc[None], scale[None], model.config.family).sum(-1)
           for part in flat.split(rows)]
    return torch.cat(out).view(*z.shape[:-1], loc.shape[0])


def masked_log_pi(model: CMVAE, active: torch.Tensor) -> torch.Tensor:
    """log pi [K] renormalised over the active clusters, -inf elsewhere."""
    return torch.log_softmax(model.prior_logits.detach().masked_fill(~active, float("-inf")), dim=-1)


def _posterior(comp: torch.Tensor, log_pi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """comp [M, N, K], log_pi [K] -> (log p(z) [M, N], p(c|z) [M, N, K], entropy in nats [M, N])."""
    joint = comp + log_pi
    logp = torch.logsumexp(joint, dim=-1)
    log_resp = joint - logp[..., None]
    resp = log_resp.exp()
    # Pruned clusters have resp 0 and log_resp -inf: 0 * log 0 counts as 0.
    entropy = -torch.where(resp > 0, resp * log_resp, torch.zeros_like(resp)).sum(-1)
    return logp, resp, entropy


@torch.no_grad()
def assign_with(model: CMVAE, z: torch.Tensor, active: torch.Tensor | list[int] | None = None,
                assign: str = "vote", comp: torch.Tensor | None = None) -> torch.Tensor:
    """Cluster of each datapoint [N] under an active set (a bool mask [K] or a list of ids; None: the model's)."""
    _check_assign(assign)
    mask = _as_mask(model, active)
    comp = component_logpdf(model, z) if comp is None else comp
    return assign_by_rule(_posterior(comp, masked_log_pi(model, mask))[1], assign)[0]


def _as_mask(model: CMVAE, active: torch.Tensor | list[int] | None) -> torch.Tensor:
    k = model.config.n_clusters
    device = model.prior_logits.device
    if active is None:
        return model.cluster_active.clone()
    if isinstance(active, torch.Tensor) and active.dtype == torch.bool:
        if active.shape != (k,):
            raise ValueError(f"an active mask must have shape ({k},), got {tuple(active.shape)}")
        return active.to(device)
    ids = [int(c) for c in active]
    bad = [c for c in ids if not 0 <= c < k]
    if bad or not ids:
        raise ValueError(f"cluster ids must be a non-empty subset of 0..{k - 1}, got {ids}")
    mask = torch.zeros(k, dtype=torch.bool, device=device)
    mask[ids] = True
    return mask


def _check_latents(model: CMVAE, z: torch.Tensor) -> None:
    cfg = model.config
    if z.dim() != 3 or z.shape[0] != cfg.n_modalities or z.shape[2] != cfg.z_dim:
        raise ValueError(f"z must be [M={cfg.n_modalities}, N, Dz={cfg.z_dim}] (one draw per datapoint and "
                         f"modality), got {tuple(z.shape)}")
    if z.shape[1] == 0:
        raise ValueError("z holds no datapoints: prune needs a non-empty split")


@torch.no_grad()
def prune_latents(model: CMVAE, z: torch.Tensor, *, beta: float, labels=None, entropy_norm: str = "initial",
                  assign: str = "vote") -> PruneResult:
    """All pruning steps from z [M, N, Dz] (one draw per datapoint and modality, reused at every step).

    Starts from the model's active clusters (all, after training) and prunes down to one; the chosen set is
    the one with the lowest PNE strictly below the unpruned PNE, the one-cluster step excluded; when none
    is below, every cluster is kept and `improved` is False.
    """
    check_options(entropy_norm, assign)
    _check_latents(model, z)
    z = z.to(model.prior_logits.device, torch.float32)
    k_total, n_dz = model.config.n_clusters, model.config.z_dim
    active = model.cluster_active.clone()
    k0 = int(active.sum())  # sync point (once)
    if k0 < 2:
        raise ValueError(f"prune needs at least 2 active clusters, the model has {k0}")
    labels = None if labels is None else np.asarray(labels)
    if labels is not None and len(labels) != z.shape[1]:
        raise ValueError(f"labels has {len(labels)} entries for {z.shape[1]} datapoints")

    comp = component_logpdf(model, z)
    ids = torch.arange(k_total, device=z.device)
    masks, pnes, ents, logliks, assigned = [], [], [], [], []
    for step in range(k0):
        k_active = k0 - step
        logp, resp, entropy = _posterior(comp, masked_log_pi(model, active))
        norm = math.log(k_total) if entropy_norm == "initial" else math.log(k_active)
        # Means over modalities, then over data; with one active cluster the entropy is exactly 0.
        ent = (entropy / norm).mean(0).mean() if norm > 0 else entropy.new_zeros(())
        loglik = (logp / n_dz).mean(0).mean()
        cluster, confidence = assign_by_rule(resp, assign)
        masks.append(active.clone())
        pnes.append(beta * ent - loglik)
        ents.append(ent)
        logliks.append(loglik)
        assigned.append(cluster)
        if k_active == 1:
            break
        mass = torch.zeros(k_total, dtype=confidence.dtype, device=z.device).scatter_add_(0, cluster, confidence)
        mass = mass.masked_fill(~active, float("inf"))
        lowest = active & (mass == mass.min())
        victim = torch.where(lowest, ids, -1).max()  # ties to the highest id
        active = active & (ids != victim)

    # One transfer for the whole curve.
    masks_h = torch.stack(masks).cpu().numpy()
    pne_h, ent_h, ll_h = (torch.stack(t).double().cpu().numpy() for t in (pnes, ents, logliks))
    assigned_h = torch.stack(assigned).cpu().numpy()
    curve = []
    for s in range(len(masks)):
        entry = {"k": int(masks_h[s].sum()), "active": np.flatnonzero(masks_h[s]).tolist(),
                 "pne": float(pne_h[s]), "entropy": float(ent_h[s]), "loglik": float(ll_h[s])}
        if labels is not None:
            entry.update(clustering_scores(labels, assigned_h[s]))
        curve.append(entry)
    return choose(curve)


def choose(curve: list[dict]) -> PruneResult:
    """The selection rule on a pruning curve (curve[0]: nothing pruned): the step with the lowest PNE among those
    with at least 2 clusters whose PNE is strictly below the unpruned one; on equal PNE the earlier (larger) set.
    When no step qualifies, every cluster is kept (`improved` False). A non-finite PNE never qualifies, and a
    non-finite unpruned PNE keeps every cluster."""
    baseline = curve[0]["pne"]
    if not math.isfinite(baseline):
        return PruneResult(list(curve[0]["active"]), curve[0]["k"], False, baseline, curve)
    candidates = [e for e in curve[1:] if e["k"] >= 2 and math.isfinite(e["pne"]) and e["pne"] < baseline]
    if candidates:
        best = min(candidates, key=lambda e: e["pne"])  # min keeps the first: on equal PNE, the larger set
        return PruneResult(list(best["active"]), best["k"], True, baseline, curve)
    return PruneResult(list(curve[0]["active"]), curve[0]["k"], False, baseline, curve)


@torch.no_grad()
def draw_latents(model: CMVAE, images: torch.Tensor, *, batch_size: int = 512,
                 generator: torch.Generator | None = None, progress: ProgressFn | None = None) -> torch.Tensor:
    """One encoder pass over images [M, N, C, H, W] (uint8 or float) -> one z ~ q_m(z|x_m) each [M, N, Dz].
    `progress`: (batches done, batches)."""
    device = model.prior_logits.device
    was_training = model.training
    model.eval()
    try:
        zs = []
        for start in range(0, images.shape[1], batch_size):
            post = model.encode(to_float(images[:, start:start + batch_size].to(device, non_blocking=True)))
            zs.append(rsample(post.z_loc, post.z_scale, model.config.family, generator=generator))
            report(progress, len(zs), batches(images.shape[1], batch_size))
    finally:
        model.train(was_training)
    return torch.cat(zs, dim=1)


def prune_model(model: CMVAE, images: torch.Tensor, *, beta: float, labels=None, entropy_norm: str = "initial",
                assign: str = "vote", batch_size: int = 512,
                generator: torch.Generator | None = None) -> PruneResult:
    """One encoder pass over images [M, N, C, H, W], then prune_latents. The model is not modified."""
    check_options(entropy_norm, assign)
    z = draw_latents(model, images, batch_size=batch_size, generator=generator)
    return prune_latents(model, z, beta=beta, labels=labels, entropy_norm=entropy_norm, assign=assign)


@torch.no_grad()
def apply_pruning(model: CMVAE, chosen: list[int]) -> None:
    """Keep exactly the clusters in `chosen` (ids); the others get zero prior mass via model.cluster_active."""
    model.cluster_active.copy_(_as_mask(model, list(chosen)))
