"""Image grids of an MFCVAE run: per-facet cluster grids and the facet-swap grid (seed 003, Fig. 5)."""

from __future__ import annotations

from pathlib import Path

import torch

from cmvae_engine.cmvae.clustering import to_float
from cmvae_engine.cmvae.mfcvae.model import MFCVAE
from cmvae_engine.engine.images import cluster_labels, save_grid


def facet_grid_name(j: int) -> str:
    return f"facet{j}_clusters.png"


SWAP = "facet_swap.png"
RECON = "recon.png"


@torch.no_grad()
def write_facet_grids(model: MFCVAE, out: Path, generator: torch.Generator, n: int = 8,
                      clusters: int = 16) -> list[str]:
    """facet{j}_clusters.png: a row per cluster of facet j (at most `clusters`, by prior mass), n columns; within a
    column the other facets' z are the same draw from their priors, so a row shows what facet j's cluster fixes
    and a column what it changes."""
    names = []
    device = model.priors.loc[0].device
    for j in range(model.n_facets):
        log_pi = model.priors.params(j)[2]
        order = [int(c) for c in torch.argsort(log_pi, descending=True)][:clusters]
        others = []
        for i in range(model.n_facets):
            loc, std, lp = model.priors.params(i)
            c = torch.multinomial(lp.exp(), n, replacement=True, generator=generator)
            others.append(loc[c] + std[c] * torch.randn(loc[c].shape, generator=generator, device=device))
        rows = torch.stack([model.generate(j, c, n, generator=generator, others=others) for c in order])
        save_grid(out / facet_grid_name(j), rows.cpu(), row_labels=cluster_labels(order, log_pi.exp().tolist()),
                  title=f"facet {j}: a row per cluster ({len(order)} of {log_pi.numel()}); in each column the other "
                        "facets' z are fixed")
        names.append(facet_grid_name(j))
    return names


@torch.no_grad()
def write_swap_grid(model: MFCVAE, images: torch.Tensor, out: Path, n: int = 8) -> str:
    """facet_swap.png for the first n images (uint8 [N, C, H, W]): cell (i, k) decodes facet 0's z of image i
    (left column) with the deepest facet's z of image k (top row), the other facets' z from image i; posterior
    means throughout."""
    device = model.priors.loc[0].device
    x = to_float(images[:n].to(device))
    means = [m for m, _ in model.posterior(x)]
    n = x.shape[0]
    top = model.n_facets - 1
    cells = []
    for i in range(n):
        zs = [m[i:i + 1].expand(n, -1) for m in means]
        zs[top] = means[top]
        cells.append(model.decode(zs))
    blank = torch.ones_like(x[:1])
    # row 0: a blank corner, then the column images; row i + 1: image i, then its swaps
    grid = torch.cat([torch.cat([blank, x])[None], torch.cat([x[:, None], torch.stack(cells)], dim=1)], dim=0)
    save_grid(out / SWAP, grid.cpu(), title=f"facet swap: row image gives facet 0, column image gives facet {top}")
    return SWAP


@torch.no_grad()
def write_recon(model: MFCVAE, images: torch.Tensor, out: Path, n: int = 8) -> str:
    device = model.priors.loc[0].device
    x = to_float(images[:n].to(device))
    rec = model.decode([m for m, _ in model.posterior(x)])
    save_grid(out / RECON, torch.stack([x, rec]).cpu(), row_labels=["input", "reconstruction"])
    return RECON
