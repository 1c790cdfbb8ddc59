"""Loaders: the same batches from every data path where the order is defined, exact resume, rank slicing."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from cmvae_engine.cmvae.data import DataError, MultimodalSplit, write_dataset
from cmvae_engine.engine.loaders import BatchPlan, global_order, make_loader
from cmvae_engine.engine.shards import write_shards

N, M, B = 23, 3, 4
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> dict:
    """23 tuples of 3 random modalities; pixel [0, 0, 0] of every image holds the tuple index."""
    tmp = tmp_path_factory.mktemp("loaders")
    rng = np.random.default_rng(0)

    def split(n: int) -> MultimodalSplit:
        images = [rng.integers(0, 256, (n, 3, 28, 28), dtype=np.uint8) for _ in range(M)]
        for m in images:
            m[:, 0, 0, 0] = np.arange(n)
        return MultimodalSplit(images, rng.integers(0, 10, n))

    train = split(N)
    root = write_dataset(tmp / "ds", {"train": train, "test": split(4)}, name="toy")
    write_shards(root, root / "shards", tuples_per_shard=5)  # the default shard folder: 5, 5, 5, 5, 3
    write_shards(root, tmp / "two", tuples_per_shard=12)
    write_shards(root, tmp / "png", tuples_per_shard=5, encoding="png")
    return {"root": root, "images": torch.from_numpy(np.stack(train.modalities)), "tmp": tmp}


def load(kind: str, toy: dict, **kw) -> object:
    args = dict(dataset_root=toy["root"], batch_size=B, seed=7, drop_last=False, device=CPU, workers=0)
    return make_loader(kind, **{**args, **kw})


def ids(batch: torch.Tensor) -> list[int]:
    assert batch.dtype == torch.uint8 and batch.shape[0] == M and batch.shape[2:] == (3, 28, 28)
    assert batch.is_contiguous()
    # every modality of a tuple carries its index: a mixed-up batch would disagree across modalities
    assert torch.equal(batch[:, :, 0, 0, 0], batch[:1, :, 0, 0, 0].expand(M, -1))
    return batch[0, :, 0, 0, 0].tolist()


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("drop_last", [False, True])
def test_resident_and_files_yield_the_shared_permutation(toy: dict, drop_last: bool) -> None:
    resident = load("resident", toy, images=toy["images"], drop_last=drop_last)
    files = load("files", toy, drop_last=drop_last)
    assert (len(resident), resident.n) == ((5, 20) if drop_last else (6, 23))
    assert (len(files), files.n) == (len(resident), resident.n)
    epochs = []
    for epoch in (0, 1):
        got = list(resident.epoch(epoch))
        assert same(got, list(files.epoch(epoch)))
        order = global_order(N, 7, epoch)
        expected = [order[i * B:(i + 1) * B] for i in range(len(resident))]
        for batch, idx in zip(got, expected, strict=True):
            assert torch.equal(batch, toy["images"][:, idx])
        epochs.append([i for batch in got for i in ids(batch)])
    assert epochs[0] != epochs[1]
    if not drop_last:
        assert sorted(epochs[0]) == list(range(N))


def test_files_loader_workers_and_resume(toy: dict) -> None:
    files = load("files", toy, workers=2)
    resident = load("resident", toy)  # images=None: reads the split itself
    assert same(list(files.epoch(3)), list(resident.epoch(3)))
    assert same(list(files.epoch(3, start_batch=4)), list(resident.epoch(3))[4:])
    assert same(list(files.epoch(4)), list(resident.epoch(4)))


@pytest.mark.parametrize("kind", ["resident", "files", "webdataset"])
def test_resume_is_exact(toy: dict, kind: str) -> None:
    loader = load(kind, toy, shuffle_buffer=8)
    full = list(loader.epoch(2))
    for start in (1, 5):
        assert same(list(loader.epoch(2, start_batch=start)), full[start:])
    assert list(loader.epoch(2, start_batch=len(loader))) == []


@pytest.mark.parametrize("kind", ["resident", "files"])
@pytest.mark.parametrize("world_size", [2, 4])
def test_ranks_split_each_global_batch(toy: dict, kind: str, world_size: int) -> None:
    single = list(load(kind, toy).epoch(1))
    ranks = [load(kind, toy, rank=r, world_size=world_size) for r in range(world_size)]
    per_rank = [list(r.epoch(1)) for r in ranks]
    # the last global batch holds 3 tuples: 2 ranks split it 2 + 1; with 4 ranks one would get none: dropped
    steps = 6 if world_size == 2 else 5
    assert [len(r) for r in ranks] == [steps] * world_size
    assert sum(r.n for r in ranks) == (N if world_size == 2 else 20)
    for step in range(steps):
        union = torch.cat([batches[step] for batches in per_rank], dim=1)
        assert torch.equal(union, single[step])
    assert [b.shape[1] for b in per_rank[0]] == [B // world_size] * 5 + ([2] if world_size == 2 else [])


def test_bad_arguments(toy: dict) -> None:
    with pytest.raises(ValueError, match="batch_size 6 is the global batch and must be divisible by the world "
                                         "size 4; choose a multiple of 4"):
        load("resident", toy, batch_size=6, world_size=4)
    with pytest.raises(ValueError, match="rank 2 is not in 0..world_size-1"):
        load("files", toy, rank=2, world_size=2)
    with pytest.raises(ValueError, match="23 tuples give no batch of 32 with drop_last"):
        load("resident", toy, batch_size=32, drop_last=True)
    with pytest.raises(ValueError, match="unknown loader 'memory' \\(--loader\\); choose one of resident, files, "
                                         "webdataset, dali"):
        load("memory", toy)
    with pytest.raises(DataError, match="no shard index for the train split.*cmvae-engine data shard"):
        load("webdataset", toy, shard_dir=toy["tmp"] / "nowhere")
    with pytest.raises(DataError, match="2 shards cannot be split over 4 processes.*tuples-per-shard at most 5"):
        load("webdataset", toy, shard_dir=toy["tmp"] / "two", world_size=4)
    assert len(BatchPlan(N, B, drop_last=False, world_size=4)) == 5


def test_unshuffled_order_is_the_same_in_every_loader(toy: dict) -> None:
    expected = [list(range(i, min(i + B, N))) for i in range(0, N, B)]
    ref = list(load("resident", toy, shuffle=False).epoch(5))
    assert [ids(b) for b in ref] == expected
    assert same(list(load("files", toy, shuffle=False, workers=2).epoch(5)), ref)
    # five shards over 0 (in process) or 2 workers; two shards with 4 workers asked (capped at 2);
    # shuffle_buffer=0 is the same as shuffle=False
    for shard_dir, workers in ((None, 0), (None, 2), (toy["tmp"] / "two", 4), (toy["tmp"] / "png", 2)):
        loader = load("webdataset", toy, shard_dir=shard_dir, workers=workers, shuffle_buffer=0)
        assert loader.workers == min(workers, 5 if shard_dir is None or shard_dir.name == "png" else 2)
        assert same(list(loader.epoch(5)), ref)


def test_webdataset_shuffles_per_epoch_deterministically(toy: dict) -> None:
    loader = load("webdataset", toy, workers=2, shuffle_buffer=8)
    again = load("webdataset", toy, workers=2, shuffle_buffer=8)
    e0, e1 = list(loader.epoch(0)), list(loader.epoch(1))
    assert [b.shape[1] for b in e0] == [4, 4, 4, 4, 4, 3]
    seen0, seen1 = [i for b in e0 for i in ids(b)], [i for b in e1 for i in ids(b)]
    assert sorted(seen0) == sorted(seen1) == list(range(N))
    assert seen0 != seen1 and seen0 != list(range(N))
    assert same(list(again.epoch(0)), e0)
    other_seed = load("webdataset", toy, workers=2, shuffle_buffer=8, seed=8)
    assert [i for b in other_seed.epoch(0) for i in ids(b)] != seen0


def test_webdataset_ranks_take_disjoint_shards_in_lockstep(toy: dict) -> None:
    ranks = [load("webdataset", toy, rank=r, world_size=2, shuffle_buffer=8, workers=1) for r in range(2)]
    # 5 shards over 2 ranks: each rank has at least the 2 smallest shards (3 + 5 tuples) -> 4 batches of 2
    assert [(len(r), r.n) for r in ranks] == [(4, 8), (4, 8)]
    for epoch in (0, 1):
        seen = [[i for b in r.epoch(epoch) for i in ids(b)] for r in ranks]
        assert [len(s) for s in seen] == [8, 8] and not set(seen[0]) & set(seen[1])


def test_webdataset_drop_last_and_a_bad_shard_named_from_a_worker(toy: dict, tmp_path: Path) -> None:
    loader = load("webdataset", toy, drop_last=True, shuffle_buffer=8)
    assert (len(loader), loader.n) == (5, 20)
    assert [b.shape[1] for b in loader.epoch(0)] == [4] * 5

    bad = tmp_path / "bad"
    shutil.copytree(toy["root"] / "shards", bad)
    shard = bad / "train-000003.tar"
    blob = bytearray(shard.read_bytes())
    at = blob.find(b"\x93NUMPY")
    blob[at:at + 6] = b"broken"
    shard.write_bytes(bytes(blob))
    loader = load("webdataset", toy, shard_dir=bad, workers=2, shuffle=False)
    with pytest.raises(DataError, match=r"train-000003\.tar: member 000000015\.m0\.npy cannot be decoded"):
        list(loader.epoch(0))


def test_dali_missing_says_how_to_install(toy: dict, monkeypatch) -> None:
    import cmvae_engine.engine.loaders_dali as dali

    monkeypatch.setattr(dali, "dali_import_error", lambda: "NVIDIA DALI is not importable (ImportError: x)")
    with pytest.raises(RuntimeError, match=r"--loader dali: NVIDIA DALI is not importable .*pip install "
                                           r"'cmvae-engine\[dali\]'.*or use --loader resident\|files\|webdataset"):
        load("dali", toy)
