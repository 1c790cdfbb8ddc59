"""NVIDIA DALI loader: a DALI pipeline over the tar shards (fn.readers.webdataset) or the .npy files
(fn.readers.numpy), yielding uint8 [M, B, C, H, W] on the device.

- Over the .npy files (no shard folder): one numpy reader per modality reads each tuple as a region of
  interest [i:i+1] of m{k}.npy, with i from `global_order` fed per batch, so batches are identical to the
  resident and files loaders (shuffled or not, any world size) and resume starts at `start_batch` directly.
- Over the shards: the webdataset reader in shard order (DALI's own sample buffer shuffles when on, seeded
  from (seed, epoch)); PNG members are decoded on the GPU (`device="mixed"`) when the target is CUDA, `.npy`
  members are their pixels after a fixed-size header. With P > 1 processes DALI gives each rank a contiguous
  1/P of the tuples; every rank yields the fewest full batches any rank has, to stay in lockstep.

A pipeline is built per epoch (seeded from (seed, epoch)) so an epoch's order never depends on earlier epochs.
Without CUDA (device_id None) every operator runs on the CPU; the GPU operators are the same graph with
`device="mixed"`/`.gpu()`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from cmvae_engine.cmvae.data.errors import DataError
from cmvae_engine.cmvae.data.format import read_dataset
from cmvae_engine.engine.loaders import DEFAULT_SHUFFLE_BUFFER, BatchPlan, check_world, global_order
from cmvae_engine.engine.shards import read_index

INSTALL_HINT = ("install NVIDIA DALI: pip install 'cmvae-engine[dali]' (nvidia-dali-cuda130, Linux x86_64; "
                "for other CUDA versions see the DALI install guide), or use --loader resident|files|webdataset")


def dali_import_error() -> str | None:
    """Why DALI (with its PyTorch plugin) cannot be used here, or None when it can."""
    try:
        import nvidia.dali.fn  # noqa: F401
        import nvidia.dali.plugin.pytorch  # noqa: F401
    except Exception as err:  # ImportError, or a broken install failing while loading its libraries
        return f"NVIDIA DALI is not importable ({type(err).__name__}: {err})"
    return None


class DaliLoader:
    def __init__(self, *, dataset_root: str | Path | None, split: str = "train", shard_dir: str | Path | None = None,
                 batch_size: int, seed: int = 0, drop_last: bool = False, device: torch.device | str = "cpu",
                 rank: int = 0, world_size: int = 1, workers: int = 2, shuffle: bool = True,
                 shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER):
        reason = dali_import_error()
        if reason is not None:
            raise RuntimeError(f"--loader dali: {reason}; {INSTALL_HINT}")
        self.local_batch = check_world(batch_size, rank, world_size)
        self.device = torch.device(device)
        if self.device.type == "cuda":
            self.device_id = self.device.index if self.device.index is not None else torch.cuda.current_device()
        elif self.device.type == "cpu":
            self.device_id = None
        else:
            raise ValueError(f"--loader dali runs on CPU or CUDA devices, not {self.device}")
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.threads = max(1, workers)
        self.shuffle = shuffle
        if shard_dir is not None:
            self.index = read_index(shard_dir, split)
            self.m, self.image_shape = self.index.n_modalities, self.index.image_shape
            self.shuffle_buffer = shuffle_buffer if shuffle else 0
            self._init_shards(drop_last)
        else:
            if dataset_root is None:
                raise ValueError("--loader dali needs the data set folder or a shard folder")
            self.index = None
            tuples = read_dataset(dataset_root, mmap=True).split(split)
            if len(set(tuples.image_shapes)) != 1:
                raise DataError(f"modalities of the {split} split have different image shapes "
                                f"{tuples.image_shapes}", path=dataset_root, fix="convert them to one C x H x W")
            self.m, self.image_shape = tuples.n_modalities, tuples.image_shape
            self.files = [str(Path(dataset_root) / split / f"m{k}.npy") for k in range(self.m)]
            self.plan = BatchPlan(tuples.n, batch_size, drop_last, rank, world_size)
            self.n, self._len = self.plan.rank_n, len(self.plan)

    def _init_shards(self, drop_last: bool) -> None:
        total, ws, b = self.index.n, self.world_size, self.local_batch
        if ws == 1:
            full, rest = divmod(total, b)
            self._len = full + int(rest > 0 and not drop_last)
            self.n = total if self._len > full else full * b
        else:
            # DALI's reader gives shard r of P the tuples [floor(N r / P), floor(N (r+1) / P)).
            fewest = min((total * (r + 1)) // ws - (total * r) // ws for r in range(ws))
            self._len = fewest // b
            self.n = self._len * b
        if self._len == 0:
            raise DataError(f"{total} tuples give no batch of {b} per process", path=self.index.path,
                            fix="use a smaller batch size or more data")

    def __len__(self) -> int:
        return self._len

    # ------------------------------------------------------------------------------------------ pipelines

    def _pipeline_seed(self, epoch: int) -> int:
        return (self.seed * 1_000_003 + epoch) % (2**31 - 1)

    def _npy_pipeline(self, rois: Iterator[list[np.ndarray]], epoch: int):
        from nvidia.dali import fn, pipeline_def, types

        c, h, w = self.image_shape

        @pipeline_def(batch_size=self.local_batch, num_threads=self.threads, device_id=self.device_id,
                      seed=self._pipeline_seed(epoch), prefetch_queue_depth=2)
        def pipe():
            start = fn.external_source(source=rois, batch=True, dtype=types.INT32, ndim=1)
            outs = []
            for k, path in enumerate(self.files):
                # One "file" per batch slot: the region [i:i+1] picks the tuple, so no reader-side shuffling.
                x = fn.readers.numpy(files=[path] * self.local_batch, roi_start=start, roi_shape=[1, c, h, w],
                                     name=f"m{k}")
                outs.append(x.gpu() if self.device_id is not None else x)
            return tuple(outs)

        return pipe()

    def _shard_pipeline(self, epoch: int):
        from nvidia.dali import fn, pipeline_def, types

        index = self.index
        c, h, w = self.image_shape
        shuffling = self.shuffle_buffer > 0
        gpu = self.device_id is not None

        @pipeline_def(batch_size=self.local_batch, num_threads=self.threads, device_id=self.device_id,
                      seed=self._pipeline_seed(epoch), prefetch_queue_depth=2)
        def pipe():
            members = fn.readers.webdataset(
                paths=[str(index.shard_path(e)) for e in index.shards], ext=index.member_names(),
                missing_component_behavior="error", random_shuffle=shuffling,
                initial_fill=max(self.shuffle_buffer, 1), pad_last_batch=True, shard_id=self.rank,
                num_shards=self.world_size, name="shards",
            )
            members = members if isinstance(members, (list, tuple)) else [members]
            outs = []
            for data in members:
                if index.encoding == "png":
                    image = fn.decoders.image(data, device="mixed" if gpu else "cpu", output_type=types.ANY_DATA)
                    outs.append(fn.transpose(image, perm=[2, 0, 1]))
                else:
                    image = fn.reshape(data[index.npy_header_bytes:], shape=[c, h, w])
                    outs.append(image.gpu() if gpu else image)
            return tuple(outs)

        return pipe()

    def _rois(self, epoch: int, start_batch: int) -> Iterator[list[np.ndarray]]:
        order = global_order(self.plan.n, self.seed, epoch, self.shuffle)
        last = [np.zeros(4, np.int32)] * self.local_batch
        for i in range(start_batch, len(self.plan)):
            idx = self.plan.indices(order, i).tolist()
            idx += idx[-1:] * (self.local_batch - len(idx))  # pad a partial batch; trimmed after the run
            last = [np.array([j, 0, 0, 0], np.int32) for j in idx]
            yield last
        while True:  # DALI prefetches past the last batch we read
            yield last

    # ------------------------------------------------------------------------------------------ epochs

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[torch.Tensor]:
        if self.index is None:
            pipe, skip = self._npy_pipeline(self._rois(epoch, start_batch), epoch), 0
            sizes = [self.plan.size(i) for i in range(self._len)]
        else:
            pipe, skip = self._shard_pipeline(epoch), start_batch  # the reader cannot seek: run and discard
            sizes = [self.local_batch] * self._len
            if self.world_size == 1:
                sizes[-1] = self.n - (self._len - 1) * self.local_batch
        pipe.build()
        try:
            for _ in range(skip):
                pipe.run()
            for i in range(start_batch, self._len):
                yield self._to_torch(pipe.run(), sizes[i])
        finally:
            del pipe

    def _to_torch(self, outputs, size: int) -> torch.Tensor:
        from nvidia.dali.plugin.pytorch import feed_ndarray

        b = self.local_batch
        out = torch.empty((self.m, b, *self.image_shape), dtype=torch.uint8, device=self.device)
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        for k, tensors in enumerate(outputs):
            dense = tensors.as_tensor()
            feed_ndarray(dense, out[k].view(dense.shape()), cuda_stream=stream)
        return out if size == b else out[:, :size].contiguous()
