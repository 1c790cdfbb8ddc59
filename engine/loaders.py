"""Data paths into the training step, all yielding uint8 batches [M, B, C, H, W] on the device.

- `resident`: the whole split as uint8 on the device, gathered there with a per-epoch permutation.
- `files`: the naive baseline: a torch DataLoader reading tuples one by one from the memory-mapped .npy files,
  collated on the host and copied per step.
- `webdataset` (engine/loaders_wds.py): streaming tar shards written by `cmvae-engine data shard`.
- `dali` (engine/loaders_dali.py): an NVIDIA DALI pipeline over the shards or the .npy files.

Order: epoch e's tuple order depends only on (seed, epoch): `global_order` draws torch.randperm from a CPU
generator seeded with seed * 1_000_003 + epoch, the same on every device and in every loader that indexes
tuples (resident, files, dali over .npy), so those yield identical batches and an interrupted run resumes
exactly from (epoch, start_batch). `batch_size` is the GLOBAL batch: with world_size P each rank takes its
contiguous 1/P of every global batch, so the ranks of one step together see exactly the batch one process
would. The streaming loaders (webdataset, dali over shards) shuffle shards and a sample buffer instead; with
shuffling off they yield tuples in shard order, which is the unshuffled order of the others.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from cmvae_engine.cmvae.data.errors import DataError
from cmvae_engine.cmvae.data.format import read_dataset
from cmvae_engine.cmvae.modalities import Modalities

LOADERS = ("resident", "files", "webdataset", "dali")
DEFAULT_SHUFFLE_BUFFER = 4096
"""Tuples held by each streaming worker's shuffle buffer (PolyMNIST: ~48 MB of encoded samples per worker)."""


class Loader(Protocol):
    n: int
    """Tuples this rank sees per epoch."""

    def __len__(self) -> int:
        """Batches per epoch for this rank."""
        ...

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[torch.Tensor]:
        """uint8 [M, B, C, H, W] batches on the device; epoch e's order depends only on (seed, epoch)."""
        ...


def stack_modalities(modalities: list[np.ndarray]) -> torch.Tensor | Modalities:
    """Per-modality uint8 arrays [N, C, H, W] -> one uint8 tensor [M, N, C, H, W] (no float copy); modalities of
    different shapes or kinds -> Modalities (images uint8, token ids int64)."""
    alike = {(np.asarray(m).dtype, tuple(np.asarray(m).shape)) for m in modalities}
    if len(alike) > 1 or any(np.asarray(m).ndim != 4 for m in modalities):
        # copies, as np.stack does below: memory-mapped files stay untouched and the tensors writable
        return Modalities([torch.from_numpy(np.array(m)) if np.asarray(m).dtype == np.uint8
                           else torch.from_numpy(np.asarray(m).astype(np.int64)) for m in modalities])
    return torch.from_numpy(np.stack([np.asarray(m) for m in modalities]))


def global_order(n: int, seed: int, epoch: int, shuffle: bool = True) -> torch.Tensor:
    """The permutation of n items for (seed, epoch) as a CPU int64 tensor; arange(n) without shuffling."""
    if not shuffle:
        return torch.arange(n)
    g = torch.Generator()
    g.manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


def check_world(batch_size: int, rank: int, world_size: int) -> int:
    """This rank's share of the global batch; refuses splits that would leave ranks unequal."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in 0..world_size-1 (world_size {world_size})")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if batch_size % world_size:
        raise ValueError(f"batch_size {batch_size} is the global batch and must be divisible by the world size "
                         f"{world_size}; choose a multiple of {world_size} (each process then gets "
                         f"batch_size / {world_size} tuples)")
    return batch_size // world_size


@dataclass(frozen=True)
class BatchPlan:
    """How n tuples in a given order become global batches and each rank's share of them.

    Global batch i is order[i*B:(i+1)*B]; rank r takes part r of torch.tensor_split(batch, P) (exactly B/P
    tuples for full batches). A last partial batch is kept unless drop_last, or unless it has fewer tuples
    than ranks (then some rank would get none and data-parallel steps would hang).
    """

    n: int
    batch_size: int
    drop_last: bool = False
    rank: int = 0
    world_size: int = 1

    def __post_init__(self) -> None:
        check_world(self.batch_size, self.rank, self.world_size)
        if len(self) == 0:
            raise ValueError(f"{self.n} tuples give no batch of {self.batch_size}"
                             + (" with drop_last" if self.drop_last else f" over {self.world_size} processes")
                             + "; use a smaller batch size or more data")

    def __len__(self) -> int:
        full, rest = divmod(self.n, self.batch_size)
        return full + int(not self.drop_last and rest >= self.world_size)

    def indices(self, order: torch.Tensor, i: int) -> torch.Tensor:
        """This rank's indices of global batch i (a view of ``order``)."""
        batch = order[i * self.batch_size:(i + 1) * self.batch_size]
        if self.world_size == 1:
            return batch
        return torch.tensor_split(batch, self.world_size)[self.rank]

    def size(self, i: int) -> int:
        """Tuples of global batch i that this rank gets (tensor_split gives the first g % P ranks one more)."""
        g = min(self.batch_size, self.n - i * self.batch_size)
        return g // self.world_size + int(self.rank < g % self.world_size)

    @property
    def rank_n(self) -> int:
        """Tuples this rank sees per epoch."""
        return sum(self.size(i) for i in range(len(self)))


class ResidentLoader:
    """Batches gathered from a device-resident uint8 tensor [M, N, C, H, W] in `global_order`.

    The permutation is drawn on the host (randperm of 60,000 takes well under a millisecond) and copied to the
    device once per epoch; the gathers run on the device. Conversion to float happens in the step.
    """

    def __init__(self, images: torch.Tensor, batch_size: int, *, seed: int = 0, drop_last: bool = False,
                 device: torch.device | str = "cpu", rank: int = 0, world_size: int = 1, shuffle: bool = True):
        if not isinstance(images, Modalities) and (images.dtype != torch.uint8 or images.dim() != 5):
            raise ValueError(f"expected uint8 images [M, N, C, H, W], got {images.dtype} {tuple(images.shape)}")
        self.device = torch.device(device)
        self.images = images.to(self.device)
        self.batch_size = batch_size
        self.seed = seed
        self.drop_last = drop_last
        self.shuffle = shuffle
        self.plan = BatchPlan(images.shape[1], batch_size, drop_last, rank, world_size)

    @property
    def n(self) -> int:
        return self.plan.rank_n

    def __len__(self) -> int:
        return len(self.plan)

    def order(self, epoch: int) -> torch.Tensor:
        """The global permutation of epoch ``epoch``, on the device."""
        return global_order(self.images.shape[1], self.seed, epoch, self.shuffle).to(self.device)

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[torch.Tensor]:
        order = self.order(epoch)
        for i in range(start_batch, len(self)):
            yield self.images.index_select(1, self.plan.indices(order, i))


class _TupleFiles(Dataset):
    """Tuple i as uint8 [M, C, H, W], read from memory-mapped m{k}.npy files opened lazily in each worker."""

    def __init__(self, paths: list[Path]):
        self.paths = paths
        self._arrays: list[np.ndarray] | None = None

    def __len__(self) -> int:
        return int(self._open()[0].shape[0])

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(np.stack([a[i] for a in self._open()]))

    def _open(self) -> list[np.ndarray]:
        if self._arrays is None:
            self._arrays = [np.load(p, mmap_mode="r", allow_pickle=False) for p in self.paths]
        return self._arrays

    def __getstate__(self) -> dict:
        return {"paths": self.paths, "_arrays": None}  # memmaps are reopened, not pickled with their data


def _collate_tuples(items: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack(items, dim=1)


class _RankBatches(Sampler[list[int]]):
    """This rank's index lists of one epoch; `epoch`/`start_batch` are set before each pass (main process)."""

    def __init__(self, plan: BatchPlan, seed: int, shuffle: bool):
        self.plan, self.seed, self.shuffle = plan, seed, shuffle
        self.epoch, self.start_batch = 0, 0

    def __len__(self) -> int:
        return len(self.plan) - self.start_batch

    def __iter__(self) -> Iterator[list[int]]:
        order = global_order(self.plan.n, self.seed, self.epoch, self.shuffle)
        for i in range(self.start_batch, len(self.plan)):
            yield self.plan.indices(order, i).tolist()


class FilesLoader:
    """The naive baseline: per-item reads from the split's .npy files through a torch DataLoader.

    Same order as ResidentLoader (shared `global_order` and `BatchPlan`); each batch is collated on the host
    (pinned on CUDA) and copied to the device per step.
    """

    def __init__(self, dataset_root: str | Path, split: str, batch_size: int, *, seed: int = 0,
                 drop_last: bool = False, device: torch.device | str = "cpu", rank: int = 0, world_size: int = 1,
                 workers: int = 2, shuffle: bool = True):
        data = read_dataset(dataset_root, mmap=True)  # validates every file once, up front
        tuples = data.split(split)
        if len(set(tuples.image_shapes)) != 1:
            raise DataError(f"modalities of the {split} split have different image shapes {tuples.image_shapes}",
                            path=data.root, fix="convert all modalities to one C x H x W")
        if workers < 0:
            raise ValueError(f"workers must be >= 0, got {workers}")
        self.device = torch.device(device)
        self.plan = BatchPlan(tuples.n, batch_size, drop_last, rank, world_size)
        self._sampler = _RankBatches(self.plan, seed, shuffle)
        paths = [Path(data.root) / split / f"m{k}.npy" for k in range(tuples.n_modalities)]
        self._loader = DataLoader(
            _TupleFiles(paths), batch_sampler=self._sampler, num_workers=workers, collate_fn=_collate_tuples,
            pin_memory=self.device.type == "cuda", persistent_workers=workers > 0,
        )

    @property
    def n(self) -> int:
        return self.plan.rank_n

    def __len__(self) -> int:
        return len(self.plan)

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[torch.Tensor]:
        self._sampler.epoch, self._sampler.start_batch = epoch, start_batch
        for batch in self._loader:
            yield batch.to(self.device, non_blocking=True)


def make_loader(kind: str, *, dataset_root: Path, split: str = "train", images: torch.Tensor | None = None,
                batch_size: int, seed: int, drop_last: bool, device: torch.device, rank: int = 0,
                world_size: int = 1, workers: int = 2, shard_dir: Path | None = None, shuffle: bool = True,
                shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER) -> Loader:
    """The loader `kind` (one of LOADERS) for ``split``.

    ``images``: the split already read as uint8 [M, N, C, H, W] (resident only; read from ``dataset_root``
    when None). ``shard_dir``: folder of `cmvae-engine data shard` output (webdataset; dali reads the shards
    when given, else the .npy files); default ``dataset_root/shards``. ``workers``: worker processes (files,
    webdataset) or DALI threads. ``shuffle=False`` gives tuple order 0..N-1 in every loader;
    ``shuffle_buffer`` (streaming loaders) 0 also turns their shuffling off.
    """
    common = dict(batch_size=batch_size, seed=seed, drop_last=drop_last, device=device, rank=rank,
                  world_size=world_size)
    if kind == "resident":
        if images is None:
            images = stack_modalities(read_dataset(dataset_root).split(split).modalities)
        return ResidentLoader(images, shuffle=shuffle, **common)
    if kind == "files":
        return FilesLoader(dataset_root, split, workers=workers, shuffle=shuffle, **common)
    if kind == "webdataset":
        from cmvae_engine.engine.loaders_wds import WebDatasetLoader

        return WebDatasetLoader(shard_dir or Path(dataset_root) / "shards", split, workers=workers,
                                shuffle=shuffle, shuffle_buffer=shuffle_buffer, **common)
    if kind == "dali":
        from cmvae_engine.engine.loaders_dali import DaliLoader

        return DaliLoader(dataset_root=dataset_root, split=split, shard_dir=shard_dir, workers=workers,
                          shuffle=shuffle, shuffle_buffer=shuffle_buffer, **common)
    raise ValueError(f"unknown loader {kind!r} (--loader); choose one of {', '.join(LOADERS)}")
