"""Streaming loader over the tar shards of `cmvae-engine data shard`: a webdataset pipeline in DataLoader workers.

Per epoch: the shard list is permuted with `global_order(n_shards, seed, epoch)`; rank r takes shards r, r+P,
...; worker w of that rank takes every W-th of those (W capped at the rank's shard count: a worker without
shards would start for nothing, and webdataset's own loaders fail on it with "No samples found"). Each worker
reads its shards, shuffles samples in a buffer seeded from (seed, epoch, rank, worker), decodes them and sends
chunks of tuples; the main process copies each chunk to the device once (pinned on CUDA) and cuts the batches
there.

Without shuffling a worker sends one chunk per shard and DataLoader takes workers round-robin, so chunks
arrive in shard order whatever the worker count: tuple order 0..N-1, the unshuffled order of every loader.
With shuffling the order is fixed by (seed, epoch, world size, workers): resuming needs the same counts.

With P > 1 processes each rank yields the same number of full batches (the fewest any rank can get from its
shards), so data-parallel steps stay in lockstep; the rest of a rank's tuples that epoch is skipped.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, get_worker_info

from cmvae_engine.cmvae.data.errors import DataError
from cmvae_engine.engine.loaders import DEFAULT_SHUFFLE_BUFFER, check_world, global_order
from cmvae_engine.engine.shards import ShardEntry, ShardIndex, decode_sample, iter_shard, read_index, require_webdataset

Item = tuple[ShardEntry, int, dict]


def _worker_shards(shards: list[ShardEntry]) -> Iterator[ShardEntry]:
    info = get_worker_info()
    mine = shards if info is None else shards[info.id::info.num_workers]
    yield from mine


def _read(entries: Iterable[ShardEntry], index: ShardIndex) -> Iterator[Item]:
    for entry in entries:
        for position, sample in iter_shard(index, entry):
            yield entry, position, sample


def _shuffled(items: Iterable[Item], bufsize: int, seed_key: str) -> Iterator[Item]:
    import webdataset as wds

    info = get_worker_info()
    rng = random.Random(f"{seed_key}:{0 if info is None else info.id}")
    return wds.shuffle(bufsize, initial=bufsize, rng=rng)(iter(items))


def _chunks(items: Iterable[Item], index: ShardIndex, size: int | None) -> Iterator[torch.Tensor]:
    """Decoded tuples as uint8 [M, k, C, H, W]: one chunk per shard (size None) or chunks of ``size``."""
    buf: list[np.ndarray] = []
    current = None
    for entry, _, sample in items:
        if size is None and current is not None and entry.name != current.name and buf:
            yield _stack(buf)
            buf = []
        current = entry
        buf.append(decode_sample(index, entry, sample))
        if size is not None and len(buf) == size:
            yield _stack(buf)
            buf = []
    if buf:
        yield _stack(buf)


def _stack(tuples: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(tuples, axis=1))


class WebDatasetLoader:
    def __init__(self, shard_dir: str | Path, split: str = "train", *, batch_size: int, seed: int = 0,
                 drop_last: bool = False, device: torch.device | str = "cpu", rank: int = 0, world_size: int = 1,
                 workers: int = 2, shuffle: bool = True, shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER):
        require_webdataset()
        self.local_batch = check_world(batch_size, rank, world_size)
        if workers < 0 or shuffle_buffer < 0:
            raise ValueError(f"workers ({workers}) and shuffle_buffer ({shuffle_buffer}) must be >= 0")
        self.index = read_index(shard_dir, split)
        n_shards = len(self.index.shards)
        if n_shards < world_size:
            raise DataError(
                f"{n_shards} shards cannot be split over {world_size} processes",
                path=self.index.path,
                fix=f"re-write them with --tuples-per-shard at most {self.index.n // world_size}",
            )
        self.device = torch.device(device)
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.drop_last = drop_last
        self.shuffle_buffer = shuffle_buffer if shuffle else 0
        self.workers = min(workers, n_shards // world_size)
        if world_size == 1:
            full, rest = divmod(self.index.n, self.local_batch)
            self._len = full + int(rest > 0 and not drop_last)
            self.n = self.index.n if self._len > full else full * self.local_batch
        else:
            # Any rank holds at least the smallest n_shards // P shards, whatever the permutation.
            counts = sorted(e.n for e in self.index.shards)
            self._len = sum(counts[:n_shards // world_size]) // self.local_batch
            self.n = self._len * self.local_batch
        if self._len == 0:
            raise DataError(f"{self.index.n} tuples in shards give no batch of {self.local_batch} per process",
                            path=self.index.path, fix="use a smaller batch size or more data")

    def __len__(self) -> int:
        return self._len

    def _pipeline(self, epoch: int):
        import webdataset as wds

        shuffling = self.shuffle_buffer > 0
        order = global_order(len(self.index.shards), self.seed, epoch, shuffling)
        mine = [self.index.shards[j] for j in order[self.rank::self.world_size].tolist()]
        return wds.DataPipeline(
            functools.partial(_worker_shards, mine),
            functools.partial(_read, index=self.index),
            functools.partial(_shuffled, bufsize=self.shuffle_buffer,
                              seed_key=f"{self.seed}:{epoch}:{self.rank}") if shuffling else None,
            functools.partial(_chunks, index=self.index, size=self.local_batch if shuffling else None),
        )

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[torch.Tensor]:
        loader = DataLoader(self._pipeline(epoch), batch_size=None, num_workers=self.workers,
                            pin_memory=self.device.type == "cuda")
        chunks = iter(loader)
        try:
            yield from self._batches(chunks, start_batch)
        finally:
            del chunks  # shuts the workers down now, also when the consumer stops early

    def _batches(self, chunks: Iterator[torch.Tensor], start_batch: int) -> Iterator[torch.Tensor]:
        b, wanted = self.local_batch, self._len - start_batch
        skip = start_batch * b  # resuming: skipped tuples are read but never copied to the device
        buf, emitted, seen = None, 0, 0
        for chunk in chunks:
            seen += chunk.shape[1]
            if skip >= chunk.shape[1]:
                skip -= chunk.shape[1]
                continue
            chunk = chunk[:, skip:].to(self.device, non_blocking=True)
            skip = 0
            buf = chunk if buf is None or buf.shape[1] == 0 else torch.cat([buf, chunk], dim=1)
            while buf.shape[1] >= b and emitted < wanted:
                yield buf[:, :b].contiguous()
                buf, emitted = buf[:, b:], emitted + 1
            if emitted == wanted:
                return
        if emitted < wanted and buf is not None and buf.shape[1] > 0 and self.world_size == 1:
            yield buf.contiguous()  # the last partial batch (only planned when not drop_last)
            emitted += 1
        if emitted < wanted:
            raise DataError(f"the shards yielded {seen} tuples to this process, fewer than the {self.n} planned",
                            path=self.index.path, fix="re-write the shards (`cmvae-engine data shard ...`)")
