"""PolyMNIST reading and conversion, on small fixtures written in the exact real layout."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from cmvae_engine.cmvae.data import DataError, convert_polymnist, read_dataset, read_polymnist, resolve_dataset
from cmvae_engine.engine.cli.data_cmd import data_app

M = 3
N_TRAIN, N_TEST = 20, 6


def write_polymnist(src: Path, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Write {src}/{train,test}/m{k}/{i}.{digit}.png; return split -> (images [M, N, 3, 28, 28], labels).

    Files are written in a shuffled order, and indices past 9 make name order differ from index order.
    """
    rng = np.random.default_rng(seed)
    expected = {}
    for split, n in (("train", N_TRAIN), ("test", N_TEST)):
        images = rng.integers(0, 256, (M, n, 3, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n)
        for k in range(M):
            (src / split / f"m{k}").mkdir(parents=True)
            for i in rng.permutation(n):
                Image.fromarray(images[k, i].transpose(1, 2, 0)).save(
                    src / split / f"m{k}" / f"{i}.{labels[i]}.png"
                )
        expected[split] = (images, labels)
    return expected


@pytest.fixture
def raw(tmp_path: Path) -> tuple[Path, dict[str, tuple[np.ndarray, np.ndarray]]]:
    src = tmp_path / "PolyMNIST"
    return src, write_polymnist(src)


def _rows_of(split_images: list[np.ndarray], all_images: np.ndarray) -> np.ndarray:
    """Index of each tuple of a read split in the written images (matched by modality-0 pixels)."""
    lookup = {all_images[0, i].tobytes(): i for i in range(all_images.shape[1])}
    return np.array([lookup[img.tobytes()] for img in split_images[0]])


def test_read_holds_out_seeded_valid_fraction(raw) -> None:
    src, expected = raw
    splits = read_polymnist(src, seed=0)
    assert list(splits) == ["train", "valid", "test"]
    images, labels = expected["train"]
    train_rows, valid_rows = (
        _rows_of(splits["train"].modalities, images),
        _rows_of(splits["valid"].modalities, images),
    )
    assert len(valid_rows) == round(0.1 * N_TRAIN)
    assert sorted([*train_rows, *valid_rows]) == list(range(N_TRAIN))
    for split, rows in (("train", train_rows), ("valid", valid_rows)):
        assert list(rows) == sorted(rows)  # name order (= index order) is kept
        for k in range(M):
            np.testing.assert_array_equal(splits[split].modalities[k], images[k, rows])
        np.testing.assert_array_equal(splits[split].labels, labels[rows])
    test_images, test_labels = expected["test"]
    for k in range(M):
        np.testing.assert_array_equal(splits["test"].modalities[k], test_images[k])
    np.testing.assert_array_equal(splits["test"].labels, test_labels)

    again = read_polymnist(src, seed=0)["valid"].modalities[0]
    np.testing.assert_array_equal(again, splits["valid"].modalities[0])
    others = [_rows_of(read_polymnist(src, seed=s)["valid"].modalities, images) for s in (1, 2, 3)]
    assert any(set(o) != set(valid_rows) for o in others)


@pytest.mark.parametrize("where", [".", "test"])
def test_index_files_split_test_into_valid_and_test(raw, where: str) -> None:
    src, expected = raw
    np.save(src / where / "valid_PMtest_indices.npy", np.array([4, 1]))
    np.save(src / where / "test_PMtest_indices.npy", np.array([0, 2, 3, 5]))
    splits = read_polymnist(src)
    images, labels = expected["test"]
    for split, idx in (("valid", [4, 1]), ("test", [0, 2, 3, 5])):
        for k in range(M):
            np.testing.assert_array_equal(splits[split].modalities[k], images[k, idx])
        np.testing.assert_array_equal(splits[split].labels, labels[idx])
    assert splits["train"].n == N_TRAIN


def test_convert_writes_our_format(raw, tmp_path: Path) -> None:
    src, expected = raw
    dst = convert_polymnist(src, tmp_path / "converted", seed=0)
    data = read_dataset(dst)
    assert (data.name, data.modality_names, data.label_names) == (
        "polymnist",
        ["m0", "m1", "m2"],
        list("0123456789"),
    )
    direct = read_polymnist(src, seed=0)
    for split in ("train", "valid", "test"):
        for a, b in zip(data.split(split).modalities, direct[split].modalities, strict=True):
            np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(data.split(split).labels, direct[split].labels)


def test_cli_convert(raw, tmp_path: Path) -> None:
    src, _ = raw
    result = CliRunner().invoke(data_app, ["convert", "polymnist", str(src), str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert read_dataset(tmp_path / "out").split("train").n == N_TRAIN - 2
    result = CliRunner().invoke(data_app, ["convert", "mnist-svhn", str(src), str(tmp_path / "x")])
    assert result.exit_code == 2 and "polymnist" in result.stderr  # the known kinds are listed
    # a PolyMNIST folder given as CUBICC: the missing CUBICC file is named, nothing is written
    result = CliRunner().invoke(data_app, ["convert", "cubicc", str(src), str(tmp_path / "y")])
    assert result.exit_code == 2 and "cub.vocab" in result.stderr and not (tmp_path / "y").exists()


def test_resolve_converts_raw_polymnist_once(raw, caplog) -> None:
    src, _ = raw
    root = src.parent
    with caplog.at_level(logging.INFO, logger="cmvae_engine.cmvae.data.resolve"):
        path = resolve_dataset("polymnist", data_root=root)
        assert path == root / "polymnist" and read_dataset(path).name == "polymnist"
        assert resolve_dataset("polymnist", data_root=root) == path
    assert sum("converting raw PolyMNIST" in r.message for r in caplog.records) == 1


def test_resolve_without_polymnist_says_where_to_put_it(tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        resolve_dataset("polymnist", data_root=tmp_path)
    message = str(info.value)
    assert str(tmp_path / "PolyMNIST") in message and "train/m0" in message
    assert "cmvae-engine data convert polymnist SRC DST" in message


# ---------------------------------------------------------------------------------------------- bad inputs


def _one_file(src: Path, split: str, k: int) -> Path:
    return sorted((src / split / f"m{k}").glob("*.png"))[3]


def test_missing_file_in_one_modality(raw) -> None:
    src, _ = raw
    gone = _one_file(src, "train", 1)
    gone.unlink()
    with pytest.raises(DataError) as info:
        read_polymnist(src)
    message = str(info.value)
    assert "modality m1" in message and str(gone) in message and "Fix:" in message


def test_name_not_matching_pattern(raw) -> None:
    src, _ = raw
    bad = src / "test" / "m0" / "seven.png"
    _one_file(src, "test", 0).rename(bad)
    with pytest.raises(DataError, match="seven.png") as info:
        read_polymnist(src)
    assert "{index}.{digit}.png" in str(info.value)


def test_undecodable_png(raw) -> None:
    src, _ = raw
    bad = _one_file(src, "train", 2)
    bad.write_bytes(b"\x89PNG but not really")
    with pytest.raises(DataError) as info:
        read_polymnist(src)
    assert str(bad) in str(info.value) and "cannot be decoded" in str(info.value)


@pytest.mark.parametrize(("size", "mode", "found"), [((32, 32), "RGB", "32x32"), ((28, 28), "L", "mode L")])
def test_wrong_image_size_or_mode(raw, size: tuple[int, int], mode: str, found: str) -> None:
    src, _ = raw
    bad = _one_file(src, "test", 1)
    Image.new(mode, size).save(bad)
    with pytest.raises(DataError) as info:
        read_polymnist(src)
    assert str(bad) in str(info.value) and found in str(info.value) and "28x28x3" in str(info.value)


def test_src_missing_says_where_to_get_polymnist(tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        read_polymnist(tmp_path / "nothing")
    message = str(info.value)
    assert str(tmp_path / "nothing") in message
    assert "MoPoE" in message and "train/m0/0.5.png" in message and "nothing is downloaded" in message


@pytest.mark.parametrize(
    ("valid", "test", "problem"),
    [([1, 2], None, "without its partner"), ([1, 9], [0], "outside"), ([1, 2], [2, 3], "shares indices")],
)
def test_bad_index_files(raw, valid: list[int], test: list[int] | None, problem: str) -> None:
    src, _ = raw
    np.save(src / "valid_PMtest_indices.npy", np.array(valid))
    if test is not None:
        np.save(src / "test_PMtest_indices.npy", np.array(test))
    with pytest.raises(DataError, match=problem) as info:
        read_polymnist(src)
    assert "PMtest_indices.npy" in str(info.value)


def test_decoding_in_worker_processes_matches_and_reports_bad_files(raw) -> None:
    src, _ = raw
    serial = read_polymnist(src, workers=1)
    parallel = read_polymnist(src, workers=2)
    for split in serial:
        for a, b in zip(serial[split].modalities, parallel[split].modalities, strict=True):
            np.testing.assert_array_equal(a, b)
    bad = _one_file(src, "test", 2)
    bad.write_bytes(b"broken")
    with pytest.raises(DataError, match="cannot be decoded") as info:
        read_polymnist(src, workers=2)
    assert str(bad) in str(info.value)
