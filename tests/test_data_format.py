"""Our on-disk format: round trips, atomic rewrites and one test per kind of bad input."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cmvae_engine.cmvae.data import DataError, MultimodalSplit, read_dataset, write_dataset
from cmvae_engine.cmvae.data import format as fmt
from cmvae_engine.engine.cli.data_cmd import data_app

N = {"train": 6, "valid": 4, "test": 5}
M = 3


def make_splits(seed: int = 0, n_modalities: int = M, valid: bool = True) -> dict[str, MultimodalSplit]:
    rng = np.random.default_rng(seed)
    return {
        name: MultimodalSplit(
            [rng.integers(0, 256, (n, 3, 28, 28), dtype=np.uint8) for _ in range(n_modalities)],
            rng.integers(0, 10, n).astype(np.int32),
        )
        for name, n in N.items()
        if valid or name != "valid"
    }


@pytest.fixture
def good(tmp_path: Path) -> Path:
    return write_dataset(tmp_path / "ds", make_splits(), name="toy", label_names=[str(i) for i in range(10)])


@pytest.mark.parametrize("mmap", [False, True])
def test_round_trip(tmp_path: Path, mmap: bool) -> None:
    splits = make_splits()
    names = ["photo", "sketch", "edges"]
    root = write_dataset(
        tmp_path / "ds",
        splits,
        name="toy",
        modality_names=names,
        label_names=list("abcdefghij"),
        extra={"generator": {"seed": 3}},
    )
    data = read_dataset(root, mmap=mmap)
    assert (data.root, data.name, data.modality_names) == (root, "toy", names)
    assert data.label_names == list("abcdefghij")
    assert data.extra == {"generator": {"seed": 3}}
    assert list(data.splits) == ["train", "valid", "test"]
    assert (data.n_modalities, data.image_shape) == (M, (3, 28, 28))
    for name, split in splits.items():
        got = data.split(name)
        assert (got.n, got.n_modalities, got.image_shape) == (N[name], M, (3, 28, 28))
        for a, b in zip(got.modalities, split.modalities, strict=True):
            assert a.dtype == np.uint8
            np.testing.assert_array_equal(a, b)
        assert got.labels is not None and got.labels.dtype == np.int64
        np.testing.assert_array_equal(got.labels, split.labels)
    assert isinstance(data.split("train").modalities[0], np.memmap) == mmap


def test_without_manifest_modalities_come_from_files(good: Path) -> None:
    (good / "manifest.json").unlink()
    data = read_dataset(good)
    assert (data.name, data.modality_names, data.label_names) == ("ds", ["m0", "m1", "m2"], None)


def test_missing_split_is_a_clear_error(tmp_path: Path) -> None:
    data = read_dataset(write_dataset(tmp_path / "ds", make_splits(valid=False), name="toy"))
    assert "valid" not in data.splits
    with pytest.raises(DataError, match="no valid split in .*ds") as info:
        data.split("valid")
    assert "train, test" in str(info.value)


def test_rewrite_removes_stale_files(good: Path) -> None:
    smaller = make_splits(seed=1, n_modalities=2, valid=False)
    smaller["test"].labels = None
    write_dataset(good, smaller, name="smaller")
    data = read_dataset(good)
    assert (data.name, data.n_modalities, list(data.splits)) == ("smaller", 2, ["train", "test"])
    assert data.split("test").labels is None
    np.testing.assert_array_equal(data.split("train").modalities[1], smaller["train"].modalities[1])


def test_interrupted_write_leaves_no_manifest_and_no_temp_files(good: Path, monkeypatch) -> None:
    real_save, calls = np.save, []

    def failing_save(file, array, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise OSError("disk full")
        real_save(file, array, **kwargs)

    monkeypatch.setattr(fmt.np, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        write_dataset(good, make_splits(seed=2), name="toy")
    assert not (good / "manifest.json").exists()
    assert not [p for p in good.rglob("*") if p.name.endswith(".tmp")]


def test_manifest_is_written_after_the_arrays(good: Path) -> None:
    manifest_time = (good / "manifest.json").stat().st_mtime_ns
    assert all(p.stat().st_mtime_ns <= manifest_time for p in good.rglob("*.npy"))


def test_write_rejects_bad_splits(tmp_path: Path) -> None:
    splits = make_splits()
    del splits["test"]
    with pytest.raises(DataError, match="train and a test split"):
        write_dataset(tmp_path / "a", splits, name="x")
    splits = make_splits()
    splits["valid"].modalities[1] = splits["valid"].modalities[1].astype(np.float32)
    with pytest.raises(DataError, match="uint8"):
        write_dataset(tmp_path / "b", splits, name="x")
    with pytest.raises(DataError, match="modality names"):
        write_dataset(tmp_path / "c", make_splits(), name="x", modality_names=["a"])


# ---------------------------------------------------------------------------------------------- bad inputs


def _save(path: Path, array: np.ndarray) -> None:
    np.save(path, array)


def _manifest(root: Path, **changes: object) -> None:
    manifest = json.loads((root / "manifest.json").read_text())
    manifest.update(changes)
    (root / "manifest.json").write_text(json.dumps(manifest))


Mutation = Callable[[Path], None]
BAD_CASES: dict[str, tuple[Mutation, str, str]] = {
    # id: (how to break a good data set, file named in the message, part of the fix)
    "train missing": (lambda r: shutil.rmtree(r / "train"), "ds/train", "needs train/ and test/"),
    "test missing": (lambda r: shutil.rmtree(r / "test"), "ds/test", "cmvae-engine data synth polydigits"),
    "no modality files": (
        lambda r: [p.unlink() for p in (r / "train").glob("m*.npy")],
        "ds/train",
        "one uint8 N x C x H x W array per modality",
    ),
    "float images": (
        lambda r: _save(r / "test/m1.npy", np.zeros((5, 3, 28, 28), np.float32)),
        "test/m1.npy",
        "uint8",
    ),
    "3-D images": (
        lambda r: _save(r / "train/m0.npy", np.zeros((6, 28, 28), np.uint8)),
        "train/m0.npy",
        "x[:, None]",
    ),
    "unsupported image size": (
        lambda r: _save(r / "train/m2.npy", np.zeros((6, 3, 48, 48), np.uint8)),
        "train/m2.npy",
        "resize the images to one of 28x28, 32x32, 64x64",
    ),
    "N differs between modalities": (
        lambda r: _save(r / "valid/m1.npy", np.zeros((3, 3, 28, 28), np.uint8)),
        "valid/m1.npy",
        "same N",
    ),
    "shape differs between splits": (
        lambda r: _save(r / "test/m0.npy", np.zeros((5, 1, 28, 28), np.uint8)),
        "test/m0.npy",
        "same channels and size in every split",
    ),
    "modality file missing in a split": (
        lambda r: (r / "valid/m2.npy").unlink(),
        "valid/m2.npy",
        "same modality files",
    ),
    "extra modality file in a split": (
        lambda r: shutil.copy(r / "test/m0.npy", r / "test/m3.npy"),
        "test/m3.npy",
        "same modality files",
    ),
    "gap in modality numbers": (
        lambda r: (r / "train/m1.npy").rename(r / "train/m7.npy"),
        "train/m1.npy",
        "same modality files",
    ),
    "corrupt npy": (lambda r: (r / "test/m2.npy").write_bytes(b"not numpy"), "test/m2.npy", "numpy.save"),
    "pickled npy": (
        lambda r: np.save(r / "test/m2.npy", np.array([None], dtype=object), allow_pickle=True),
        "test/m2.npy",
        "no pickled objects",
    ),
    "labels wrong length": (
        lambda r: _save(r / "train/labels.npy", np.zeros(5, np.int64)),
        "train/labels.npy",
        "one label per tuple",
    ),
    "labels float": (
        lambda r: _save(r / "test/labels.npy", np.zeros(5, np.float32)),
        "test/labels.npy",
        "astype(np.int64)",
    ),
    "labels 3-D": (
        lambda r: _save(r / "test/labels.npy", np.zeros((5, 1, 1), np.int64)),
        "test/labels.npy",
        "ravel()",
    ),
    "labels negative": (
        lambda r: _save(r / "valid/labels.npy", -np.ones(4, np.int64)),
        "valid/labels.npy",
        "class indices 0..K-1",
    ),
    "bad JSON": (lambda r: (r / "manifest.json").write_text("{name: toy"), "ds/manifest.json", "delete it"),
    "manifest not an object": (
        lambda r: (r / "manifest.json").write_text("[1, 2]"),
        "manifest.json",
        "delete it",
    ),
    "manifest name not a string": (lambda r: _manifest(r, name=3), "manifest.json", '"name": "polymnist"'),
    "manifest modalities not strings": (
        lambda r: _manifest(r, modalities=[1, 2, 3]),
        "manifest.json",
        '"modalities": ["a", "b"]',
    ),
    "manifest modality count": (
        lambda r: _manifest(r, modalities=["a", "b"]),
        "manifest.json",
        "one name per m{k}",
    ),
    "manifest duplicate names": (
        lambda r: _manifest(r, modalities=["a", "a", "b"]),
        "manifest.json",
        "unique",
    ),
    "too few label names": (lambda r: _manifest(r, label_names=["zero"]), "labels.npy", "one name per class"),
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_input_names_file_and_fix(good: Path, case: str) -> None:
    mutate, file_named, fix = BAD_CASES[case]
    mutate(good)
    with pytest.raises(DataError) as info:
        read_dataset(good)
    message = str(info.value)
    assert file_named in message
    assert "Fix:" in message and fix in message.split("Fix:", 1)[1]


def test_missing_root_says_how_to_create_data(tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        read_dataset(tmp_path / "nowhere")
    message = str(info.value)
    assert "nowhere" in message
    assert "cmvae-engine data synth polydigits" in message
    assert "cmvae-engine data convert polymnist SRC DST" in message


def test_cli_data_error_is_one_clean_line_and_exit_code_2(good: Path) -> None:
    (good / "test/m1.npy").write_bytes(b"junk")
    result = CliRunner().invoke(data_app, ["info", str(good)])
    assert result.exit_code == 2
    assert "test/m1.npy" in result.stderr and "Fix:" in result.stderr
    assert "Traceback" not in result.output
    assert result.stderr.strip().count("\n") == 0
