"""Image grids of a trained model as tensors [rows, cols, C, H, W] in [0, 1], ready for engine.images.save_grid.

- per-cluster unconditional samples (the paper's Figure 5): one row per active cluster, columns grouped by
  modality (n samples of each, a blank tile between groups); every sample in a row shares its cluster c,
  z ~ p(z | c) is drawn per column and w_m ~ p(w_m) per column and modality;
- one cluster: rows are modalities, columns samples;
- conditional (cross-modal): the inputs of one source modality on the first row, then one row per target
  modality decoded from the source's z (w from the standard prior).
"""

from __future__ import annotations

import torch

from cmvae_engine.cmvae.model import CMVAE
from cmvae_engine.cmvae.progress import ProgressFn, report


def cluster_order(model: CMVAE) -> list[int]:
    """Active cluster ids, largest prior mass first (ties by id)."""
    log_pi = model.prior_params()[0].detach().cpu()
    active = [c for c in range(log_pi.shape[0]) if bool(model.cluster_active[c])]
    return sorted(active, key=lambda c: (-float(log_pi[c]), c))


def _spaced(groups: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate [rows, n, C, H, W] groups along the columns with one blank (white) tile between them."""
    blank = torch.ones_like(groups[0][:, :1])
    parts = []
    for i, g in enumerate(groups):
        if i:
            parts.append(blank)
        parts.append(g)
    return torch.cat(parts, dim=1)


@torch.no_grad()
def unconditional_grid(model: CMVAE, clusters: list[int], n: int,
                       generator: torch.Generator | None = None, progress: ProgressFn | None = None) -> torch.Tensor:
    """Rows: the given clusters; columns: n samples of modality 0, a blank, n of modality 1, ...
    `progress`: (rows done, rows)."""
    if not clusters:
        raise ValueError("no cluster to draw from")
    per_cluster = []  # each [M, n, C, H, W]
    for c in clusters:
        per_cluster.append(model.generate(n, cluster=c, generator=generator))
        report(progress, len(per_cluster), len(clusters))
    rows = torch.stack(per_cluster)  # [rows, M, n, C, H, W]
    return _spaced([rows[:, m] for m in range(rows.shape[1])])


@torch.no_grad()
def cluster_grid(model: CMVAE, cluster: int, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Rows: modalities; columns: n samples of one cluster."""
    return model.generate(n, cluster=cluster, generator=generator)


@torch.no_grad()
def conditional_grid(model: CMVAE, x: torch.Tensor, source: int,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """x [M, n, C, H, W] in [0, 1] -> rows: the source inputs, then every target modality generated from them."""
    if not 0 <= source < x.shape[0]:
        raise ValueError(f"source modality {source} out of range 0..{x.shape[0] - 1}")
    gen = model.generate_conditional(x[source], source, generator=generator)  # [M, n, C, H, W]
    return torch.cat([x[source][None], gen], dim=0)
