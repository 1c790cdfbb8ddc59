"""Data paths into the training step. `resident`: the whole split as uint8 on the device, shuffled there."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch


def stack_modalities(modalities: list[np.ndarray]) -> torch.Tensor:
    """Per-modality uint8 arrays [N, C, H, W] -> one uint8 tensor [M, N, C, H, W] (no float copy)."""
    return torch.from_numpy(np.stack([np.asarray(m) for m in modalities]))


class ResidentLoader:
    """Batches [M, B, C, H, W] uint8 gathered from a device-resident tensor with a per-epoch permutation.

    The permutation comes from a generator seeded with (seed, epoch), so epoch e's order is the same
    whether or not the run was interrupted before it. Conversion to float happens in the step.
    """

    def __init__(self, images: torch.Tensor, batch_size: int, *, seed: int = 0, drop_last: bool = False,
                 device: torch.device | str = "cpu"):
        if images.dtype != torch.uint8 or images.dim() != 5:
            raise ValueError(f"expected uint8 images [M, N, C, H, W], got {images.dtype} {tuple(images.shape)}")
        self.images = images.to(device)
        self.batch_size = batch_size
        self.seed = seed
        self.drop_last = drop_last
        self.device = torch.device(device)
        if drop_last and self.n < batch_size:
            raise ValueError(f"drop_last with batch_size {batch_size} leaves no batch of {self.n} tuples")

    @property
    def n(self) -> int:
        return self.images.shape[1]

    def __len__(self) -> int:
        full, rest = divmod(self.n, self.batch_size)
        return full if self.drop_last or rest == 0 else full + 1

    def order(self, epoch: int) -> torch.Tensor:
        g = torch.Generator(device=self.device)
        g.manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.n, generator=g, device=self.device)

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[torch.Tensor]:
        perm = self.order(epoch)
        for i in range(start_batch, len(self)):
            idx = perm[i * self.batch_size:(i + 1) * self.batch_size]
            yield self.images.index_select(1, idx)
