"""The DALI loader on its CPU pipeline: the same batches as the resident loader where the order is defined."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cmvae_engine.cmvae.data import MultimodalSplit, write_dataset
from cmvae_engine.engine.loaders import make_loader
from cmvae_engine.engine.loaders_dali import dali_import_error
from cmvae_engine.engine.shards import write_shards

_reason = dali_import_error()
if _reason is not None:
    pytest.skip(f"{_reason}; install the `dali` extra (nvidia-dali-cuda130) to run these", allow_module_level=True)

N, M, B = 23, 2, 4
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> dict:
    """23 tuples of 2 random RGB modalities; pixel [0, 0, 0] of every image holds the tuple index."""
    tmp = tmp_path_factory.mktemp("dali")
    rng = np.random.default_rng(1)

    def split(n: int) -> MultimodalSplit:
        images = [rng.integers(0, 256, (n, 3, 28, 28), dtype=np.uint8) for _ in range(M)]
        for m in images:
            m[:, 0, 0, 0] = np.arange(n)
        return MultimodalSplit(images, rng.integers(0, 10, n))

    root = write_dataset(tmp / "ds", {"train": split(N), "test": split(4)}, name="toy")
    write_shards(root, tmp / "npy", tuples_per_shard=5)
    write_shards(root, tmp / "png", tuples_per_shard=5, encoding="png")
    return {"root": root, "tmp": tmp}


def load(kind: str, toy: dict, **kw) -> object:
    args = dict(dataset_root=toy["root"], batch_size=B, seed=11, drop_last=False, device=CPU, workers=1)
    return make_loader(kind, **{**args, **kw})


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def ids(batches: list[torch.Tensor]) -> list[int]:
    return [i for b in batches for i in b[0, :, 0, 0, 0].tolist()]


@pytest.mark.parametrize("shuffle", [True, False])
def test_over_npy_files_equals_resident_for_every_rank(toy: dict, shuffle: bool) -> None:
    for world_size in (1, 2):
        for rank in range(world_size):
            kw = dict(shuffle=shuffle, rank=rank, world_size=world_size)
            dali, resident = load("dali", toy, **kw), load("resident", toy, **kw)
            assert (len(dali), dali.n) == (len(resident), resident.n)
            for epoch in (0, 1):
                expected = list(resident.epoch(epoch))
                assert same(list(dali.epoch(epoch)), expected)
            assert same(list(dali.epoch(1, start_batch=4)), expected[4:])


@pytest.mark.parametrize("encoding", ["npy", "png"])
def test_over_shards_unshuffled_equals_resident(toy: dict, encoding: str) -> None:
    for drop_last in (False, True):
        dali = load("dali", toy, shard_dir=toy["tmp"] / encoding, shuffle=False, drop_last=drop_last)
        expected = list(load("resident", toy, shuffle=False, drop_last=drop_last).epoch(0))
        assert len(dali) == len(expected) == (5 if drop_last else 6)
        assert same(list(dali.epoch(0)), expected)


def test_over_shards_shuffled_per_epoch_with_exact_resume(toy: dict) -> None:
    dali = load("dali", toy, shard_dir=toy["tmp"] / "npy", shuffle_buffer=8)
    e0, e1 = list(dali.epoch(0)), list(dali.epoch(1))
    assert [b.shape[1] for b in e0] == [4, 4, 4, 4, 4, 3]
    assert sorted(ids(e0)) == sorted(ids(e1)) == list(range(N))
    assert ids(e0) != ids(e1) and ids(e0) != list(range(N))
    assert same(list(dali.epoch(0)), e0)
    assert same(list(dali.epoch(0, start_batch=2)), e0[2:])
    ranks = [load("dali", toy, shard_dir=toy["tmp"] / "npy", rank=r, world_size=2, shuffle=False) for r in range(2)]
    # DALI splits 23 tuples 11 + 12 over 2 ranks; both yield the 5 full batches of 2 the smaller rank has
    assert [(len(r), r.n) for r in ranks] == [(5, 10), (5, 10)]
    assert ids(list(ranks[0].epoch(0))) == list(range(10)) and ids(list(ranks[1].epoch(0))) == list(range(11, 21))
