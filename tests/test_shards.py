"""WebDataset shards: what `data shard` writes, and one test per kind of bad shard (each error names the shard)."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cmvae_engine.cmvae.data import DataError, MultimodalSplit, read_dataset, write_dataset
from cmvae_engine.engine.cli.data_cmd import data_app
from cmvae_engine.engine.shards import decode_sample, iter_shard, read_index, verify_shards, write_shards

N, M = 23, 3


def make_data(root: Path, channels: int = 3, labels: bool = True) -> Path:
    rng = np.random.default_rng(0)

    def split(n: int) -> MultimodalSplit:
        images = [rng.integers(0, 256, (n, channels, 28, 28), dtype=np.uint8) for _ in range(M)]
        return MultimodalSplit(images, rng.integers(0, 10, n) if labels else None)

    return write_dataset(root, {"train": split(N), "test": split(4)}, name="toy")


def read_all(shard_dir: Path, split: str = "train") -> tuple[np.ndarray, list[int], list[str]]:
    """Every tuple of .npy shards as [M, N, C, H, W], the labels and the keys, read with tarfile alone."""
    images, labels, keys = {}, [], []
    index = read_index(shard_dir, split)
    for entry in index.shards:
        with tarfile.open(index.shard_path(entry)) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                data = tar.extractfile(member).read()
                if ext == "cls":
                    labels.append(int(data))
                    keys.append(key)
                else:
                    images[(key, ext)] = np.load(io.BytesIO(data))
    stacked = np.stack([np.stack([images[(k, f"m{m}.{index.encoding}")] for k in keys]) for m in range(M)])
    return stacked, labels, keys


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_data(tmp_path_factory.mktemp("toy") / "ds")


@pytest.fixture(scope="module")
def shards(data: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    write_shards(data, out, tuples_per_shard=5)
    return out


@pytest.fixture
def copy(shards: Path, tmp_path: Path) -> Path:
    out = tmp_path / "copy"
    shutil.copytree(shards, out)
    return out


def test_layout_index_and_contents(data: Path, shards: Path) -> None:
    train = read_dataset(data).split("train")
    raw = json.loads((shards / "train-index.json").read_text())
    assert sorted(p.name for p in shards.iterdir()) == [f"train-00000{i}.tar" for i in range(5)] + ["train-index.json"]
    assert (raw["n"], raw["encoding"], raw["modalities"], raw["image_shape"], raw["labels"]) == (
        N, "npy", ["m0", "m1", "m2"], [3, 28, 28], True)
    assert [(s["first"], s["n"]) for s in raw["shards"]] == [(0, 5), (5, 5), (10, 5), (15, 5), (20, 3)]
    assert [s["bytes"] for s in raw["shards"]] == [(shards / s["name"]).stat().st_size for s in raw["shards"]]
    images, labels, keys = read_all(shards)
    assert keys == [f"{i:09d}" for i in range(N)]
    np.testing.assert_array_equal(images, np.stack(train.modalities))
    assert labels == train.labels.tolist()
    # The .npy header length DALI skips: pixels are the member's last C*H*W bytes.
    with tarfile.open(shards / "train-000001.tar") as tar:
        member = tar.extractfile("000000005.m2.npy").read()
    assert member[raw["npy_header_bytes"]:] == train.modalities[2][5].tobytes()
    assert verify_shards(shards).n == N


def test_same_data_gives_identical_shards(data: Path, shards: Path, tmp_path: Path) -> None:
    write_shards(data, tmp_path, tuples_per_shard=5)
    for i in range(5):
        name = f"train-00000{i}.tar"
        assert (tmp_path / name).read_bytes() == (shards / name).read_bytes()


@pytest.mark.parametrize("channels", [1, 3])
def test_png_round_trip(tmp_path: Path, channels: int) -> None:
    root = make_data(tmp_path / "ds", channels=channels, labels=False)
    index = write_shards(root, tmp_path / "png", tuples_per_shard=10, encoding="png")
    assert (index.encoding, index.image_shape, index.labels) == ("png", (channels, 28, 28), False)
    samples = [(e, s) for e in index.shards for _, s in iter_shard(index, e)]
    assert len(samples) == N and all("cls" not in s for _, s in samples)
    got = np.stack([decode_sample(index, e, s) for e, s in samples], axis=1)
    np.testing.assert_array_equal(got, np.stack(read_dataset(root).split("train").modalities))


def test_rewrite_removes_stale_shards_and_keeps_other_splits(data: Path, tmp_path: Path) -> None:
    write_shards(data, tmp_path, tuples_per_shard=5)
    write_shards(data, tmp_path, split="test", tuples_per_shard=3)
    write_shards(data, tmp_path, tuples_per_shard=12)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["test-000000.tar", "test-000001.tar", "test-index.json", "train-000000.tar",
                     "train-000001.tar", "train-index.json"]
    assert [e.n for e in read_index(tmp_path).shards] == [12, 11]
    assert read_index(tmp_path, "test").n == 4


def test_bad_arguments(tmp_path: Path, data: Path) -> None:
    with pytest.raises(DataError, match="unknown encoding 'jpg'"):
        write_shards(data, tmp_path, encoding="jpg")
    with pytest.raises(DataError, match="tuples-per-shard must be >= 1"):
        write_shards(data, tmp_path, tuples_per_shard=0)
    with pytest.raises(DataError, match="no valid split"):
        write_shards(data, tmp_path, split="valid")
    five = make_data(tmp_path / "five", channels=5)
    with pytest.raises(DataError, match="PNG stores 1 to 4 channels.*--encoding npy"):
        write_shards(five, tmp_path / "out", encoding="png")


def test_truncated_shard(copy: Path) -> None:
    shard = copy / "train-000002.tar"
    shard.write_bytes(shard.read_bytes()[:20000])
    with pytest.raises(DataError, match=r"train-000002\.tar: shard is 20000 bytes .* truncated.*data shard"):
        read_index(copy)
    index = read_index(copy, check_files=False)  # reading catches it too
    with pytest.raises(DataError, match=r"train-000002\.tar: unreadable after 1 samples \(member 000000011\.m\d\.npy "
                                        r"needs 2480 bytes but the file ends \d+ bytes into it \(truncated\)\)"):
        list(iter_shard(index, index.shards[2]))
    # cut exactly between two members: tarfile's stream mode would report a clean, shorter archive
    with tarfile.open(copy / "train-000001.tar") as tar:
        at = tar.getmember("000000008.cls").offset
    (copy / "train-000001.tar").write_bytes((copy / "train-000001.tar").read_bytes()[:at])
    with pytest.raises(DataError, match=r"train-000001\.tar: unreadable after 2 samples \(the file ends at byte "
                                        rf"{at} without the end-of-archive marker \(truncated\)\)"):
        list(iter_shard(index, index.shards[1]))


def test_corrupt_member(copy: Path) -> None:
    shard = copy / "train-000001.tar"
    blob = bytearray(shard.read_bytes())
    at = blob.find(b"\x93NUMPY", blob.find(b"\x93NUMPY") + 1)  # the second member's .npy magic
    blob[at:at + 6] = b"garbag"
    shard.write_bytes(bytes(blob))  # same size: only reading the member can tell
    with pytest.raises(DataError, match=r"train-000001\.tar: member 000000005\.m1\.npy cannot be decoded"):
        verify_shards(copy)


def test_corrupt_tar_header(copy: Path) -> None:
    shard = copy / "train-000003.tar"
    with tarfile.open(shard) as tar:
        at = tar.getmember("000000016.m0.npy").offset  # the header of the second sample's m0
    blob = bytearray(shard.read_bytes())
    blob[at + 100:at + 108] = b"zzzzzzzz"  # its mode field: the header checksum no longer matches
    shard.write_bytes(bytes(blob))
    with pytest.raises(DataError, match=r"train-000003\.tar: unreadable after 1 samples \(bad tar header checksum "
                                        rf"at byte {at}\)"):
        verify_shards(copy)


def test_missing_member(copy: Path) -> None:
    from webdataset import TarWriter

    index = read_index(copy)
    samples = [s for _, s in iter_shard(index, index.shards[1])]
    buf = io.BytesIO()
    with TarWriter(buf, encoder=False, mtime=0) as w:
        for s in samples:
            drop = "m1.npy" if s["__key__"] == "000000007" else None
            w.write({k: v for k, v in s.items() if k not in ("__url__", drop)})
    (copy / "train-000001.tar").write_bytes(buf.getvalue())
    raw = json.loads((copy / "train-index.json").read_text())
    raw["shards"][1]["bytes"] = len(buf.getvalue())
    (copy / "train-index.json").write_text(json.dumps(raw))
    with pytest.raises(DataError, match=r"train-000001\.tar: sample 000000007 lacks m1\.npy"):
        verify_shards(copy)


def test_index_and_shards_disagree(copy: Path) -> None:
    a, b = copy / "train-000000.tar", copy / "train-000003.tar"  # equal sizes: only the keys differ
    blob = a.read_bytes()
    a.write_bytes(b.read_bytes())
    b.write_bytes(blob)
    with pytest.raises(DataError, match=r"train-000000\.tar: sample 0 has key '000000015', expected 000000000"):
        verify_shards(copy)

    raw = json.loads((copy / "train-index.json").read_text())
    raw["shards"][4]["n"], raw["n"] = 4, N + 1
    (copy / "train-index.json").write_text(json.dumps(raw))
    index = read_index(copy)
    with pytest.raises(DataError, match=r"train-000004\.tar: holds 3 tuples, the index records 4"):
        list(iter_shard(index, index.shards[4]))

    (copy / "train-000002.tar").unlink()
    with pytest.raises(DataError, match=r"train-000002\.tar: shard listed in the index is missing"):
        read_index(copy)
    (copy / "train-index.json").write_text("{not json")
    with pytest.raises(DataError, match=r"train-index\.json: unreadable shard index"):
        read_index(copy)
    with pytest.raises(DataError, match=r"no shard index for the test split.*data shard"):
        read_index(copy, "test")


def test_cli(data: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(data_app, ["shard", str(data), str(tmp_path / "s"), "--tuples-per-shard", "10",
                                      "--encoding", "png", "--split", "test"])
    assert result.exit_code == 0, result.output
    assert "wrote 1 shards (4 test tuples, 3 modalities, png" in result.output
    assert read_index(tmp_path / "s", "test").encoding == "png"
    result = runner.invoke(data_app, ["shard", str(data), str(tmp_path / "s"), "--encoding", "jpg"])
    assert result.exit_code == 2
    assert "error: unknown encoding 'jpg'. Fix: use --encoding npy or png" in result.output
