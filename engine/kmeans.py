"""k-means on the training device: k-means++ seeding, Lloyd iterations, several restarts run as one batch.

Used by the `fast` recipe on the posterior means of z (e.g. 5,120 x 32 points, K=40): every restart's
distances are one [R, N, K] tensor, so a fit is a few dozen batched matmuls and never leaves the device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class KMeansResult:
    centroids: torch.Tensor
    """[K, D] of the restart with the lowest inertia."""
    labels: torch.Tensor
    """[N] index of each point's nearest centroid."""
    inertia: torch.Tensor
    """Scalar (device): summed squared distance of the points to their centroids."""
    counts: torch.Tensor
    """[K] points per centroid."""


def _sq_dist(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """x [N, D], c [R, K, D] -> squared distances [R, N, K], clamped at 0 (the expansion can go slightly negative)."""
    xx = (x * x).sum(-1)
    cc = (c * c).sum(-1)
    return (xx[None, :, None] - 2.0 * torch.einsum("nd,rkd->rnk", x, c) + cc[:, None, :]).clamp_min_(0.0)


def _seed_plus_plus(x: torch.Tensor, k: int, restarts: int, generator: torch.Generator | None) -> torch.Tensor:
    """k-means++ seeding for every restart at once -> [R, K, D]."""
    n = x.shape[0]
    first = torch.randint(n, (restarts,), device=x.device, generator=generator)
    cent = x.new_empty(restarts, k, x.shape[1])
    cent[:, 0] = x[first]
    closest = _sq_dist(x, cent[:, :1]).squeeze(-1)  # [R, N]
    for j in range(1, k):
        # Points already at a centroid (distance 0) are never drawn again unless every distance is 0.
        weights = closest + (closest.sum(-1, keepdim=True) == 0).to(closest.dtype)
        pick = torch.multinomial(weights, 1, generator=generator).squeeze(-1)
        cent[:, j] = x[pick]
        closest = torch.minimum(closest, _sq_dist(x, cent[:, j:j + 1]).squeeze(-1))
    return cent


@torch.no_grad()
def kmeans(x: torch.Tensor, k: int, *, restarts: int = 4, iters: int = 30,
           generator: torch.Generator | None = None) -> KMeansResult:
    """Fit k centroids to x [N, D]; the restart with the lowest inertia wins.

    A centroid that loses all its points keeps its previous position for that iteration (it can win points
    back later); a fixed iteration count instead of a convergence test keeps the host out of the loop.
    """
    if x.dim() != 2:
        raise ValueError(f"kmeans expects points [N, D], got shape {tuple(x.shape)}")
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"kmeans needs 1 <= k <= N points, got k={k}, N={n}")
    if restarts < 1 or iters < 0:
        raise ValueError(f"restarts must be >= 1 and iters >= 0, got {restarts}, {iters}")
    x = x.float()
    cent = _seed_plus_plus(x, k, restarts, generator)
    for _ in range(iters):
        labels = _sq_dist(x, cent).argmin(-1)  # [R, N]
        onehot = torch.nn.functional.one_hot(labels, k).to(x.dtype)  # [R, N, K]
        counts = onehot.sum(1)  # [R, K]
        sums = torch.einsum("rnk,nd->rkd", onehot, x)
        cent = torch.where(counts[..., None] > 0, sums / counts.clamp_min(1.0)[..., None], cent)
    dist = _sq_dist(x, cent)
    best_d, labels = dist.min(-1)  # [R, N]
    inertia = best_d.sum(-1)  # [R]
    r = inertia.argmin()
    labels_r = labels[r]
    return KMeansResult(cent[r], labels_r, inertia[r], torch.bincount(labels_r, minlength=k))
