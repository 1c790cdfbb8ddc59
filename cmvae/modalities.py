"""Modalities of different shapes (images of several sizes, captions) as one batch object.

Homogeneous data travels as one tensor [M, N, C, H, W]; modalities that differ in shape or kind (a 64x64 image and
a caption of token ids) cannot be stacked. `Modalities` holds one tensor per modality, all with the same N on
their first axis, and answers the few operations the engine applies to a stacked tensor: `x[m]` (modality m),
`x[:, rows]` and `x[m, rows]`, `index_select(1, idx)`, `.to(device)`, `.shape[0]` (M) and `.shape[1]` (N). So the
loaders, the evaluation, pruning and the recipes take either without knowing which.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class Modalities:
    """One tensor per modality, [N, ...] each (image uint8 [N, C, H, W] or float; captions int64 [N, L])."""

    def __init__(self, parts: Sequence[torch.Tensor]):
        parts = list(parts)
        if not parts:
            raise ValueError("Modalities needs at least one tensor")
        n = {int(p.shape[0]) for p in parts}
        if len(n) != 1:
            raise ValueError(f"every modality needs the same number of rows, got {[int(p.shape[0]) for p in parts]}")
        self.parts = parts

    @property
    def shape(self) -> tuple[int, ...]:
        """(M, N, *trailing dims of modality 0): M and N as a stacked tensor; the rest describes modality 0."""
        return (len(self.parts), *self.parts[0].shape)

    @property
    def device(self) -> torch.device:
        return self.parts[0].device

    @property
    def dtype(self) -> torch.dtype:
        return self.parts[0].dtype

    def __len__(self) -> int:
        return len(self.parts)

    def __iter__(self):
        return iter(self.parts)

    def dim(self) -> int:
        return len(self.shape)

    def __getitem__(self, key):
        if isinstance(key, int):
            return self.parts[key]
        if isinstance(key, tuple) and len(key) == 2:
            which, rows = key
            if isinstance(which, int):
                return self.parts[which][rows]
            if isinstance(which, slice) and which == slice(None):
                return Modalities([p[rows] for p in self.parts])
        raise TypeError(f"Modalities supports x[m], x[:, rows] and x[m, rows], not {key!r}")

    def index_select(self, dim: int, index: torch.Tensor) -> Modalities:
        if dim != 1:
            raise ValueError("Modalities selects rows only (dim 1)")
        return Modalities([p.index_select(0, index.to(p.device)) for p in self.parts])

    def to(self, *args, **kwargs) -> Modalities:
        return Modalities([p.to(*args, **kwargs) for p in self.parts])

    def map(self, fn) -> Modalities:
        return Modalities([fn(p) for p in self.parts])

    def __repr__(self) -> str:
        return "Modalities(" + ", ".join(f"{p.dtype} {tuple(p.shape)}" for p in self.parts) + ")"


def is_modalities(x: object) -> bool:
    return isinstance(x, Modalities)
