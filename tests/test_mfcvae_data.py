"""Multi-factor labels in the project's format ((N, F) labels.npy with the manifest's `factors`), their
validation, single-modality folders, and the built-in two-factor FacetDigits set."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cmvae_engine.cmvae.data import DataError, MultimodalSplit, read_dataset, write_dataset
from cmvae_engine.cmvae.data.facetdigits import DIGITS, STYLES, make_facetdigits_splits, synth_facetdigits
from cmvae_engine.cmvae.data.resolve import resolve_dataset


def _split(n, f, rng, k=3):
    labels = rng.integers(0, k, size=(n, f)) if f else rng.integers(0, k, size=n)
    return MultimodalSplit([rng.integers(0, 256, size=(n, 3, 28, 28), dtype=np.uint8)], labels)


def test_two_factor_labels_round_trip_with_their_names(tmp_path):
    rng = np.random.default_rng(0)
    splits = {"train": _split(10, 2, rng), "test": _split(6, 2, rng)}
    write_dataset(tmp_path / "d", splits, name="d", factors=["shape", "hue"])
    data = read_dataset(tmp_path / "d")
    assert data.factors == ["shape", "hue"] and data.n_modalities == 1
    np.testing.assert_array_equal(data.split("train").labels, splits["train"].labels)
    assert json.loads((tmp_path / "d" / "manifest.json").read_text())["factors"] == ["shape", "hue"]


def test_one_dimensional_labels_are_one_factor(tmp_path):
    rng = np.random.default_rng(1)
    write_dataset(tmp_path / "d", {"train": _split(8, 0, rng), "test": _split(4, 0, rng)}, name="d")
    assert read_dataset(tmp_path / "d").factors == ["class"]


@pytest.mark.parametrize("shape, match", [((10, 2, 1), "expected an integer array of shape"),
                                          ((10, 0), "expected an integer array of shape"),
                                          ((9, 2), "holds 9 labels but the split's modality files hold 10")])
def test_bad_label_arrays_name_the_file_and_the_fix(tmp_path, shape, match):
    rng = np.random.default_rng(2)
    write_dataset(tmp_path / "d", {"train": _split(10, 2, rng), "test": _split(4, 2, rng)}, name="d")
    np.save(tmp_path / "d" / "train" / "labels.npy", np.zeros(shape, dtype=np.int64))
    with pytest.raises(DataError, match=match) as err:
        read_dataset(tmp_path / "d")
    assert str(tmp_path / "d" / "train" / "labels.npy") in str(err.value) and "Fix:" in str(err.value)


def test_factor_names_must_match_the_columns(tmp_path):
    rng = np.random.default_rng(3)
    write_dataset(tmp_path / "d", {"train": _split(10, 2, rng), "test": _split(4, 2, rng)}, name="d",
                  factors=["a", "b"])
    manifest = tmp_path / "d" / "manifest.json"
    m = json.loads(manifest.read_text())
    m["factors"] = ["a", "b", "c"]
    manifest.write_text(json.dumps(m))
    with pytest.raises(DataError, match=r"`factors` lists 3 names .* holds 2 factor columns") as err:
        read_dataset(tmp_path / "d")
    assert "manifest.json" in str(err.value)
    with pytest.raises(DataError, match="lists 1 names"):
        write_dataset(tmp_path / "e", {"train": _split(10, 2, rng), "test": _split(4, 2, rng)}, name="e",
                      factors=["a"])


def test_splits_with_different_factor_counts_are_refused(tmp_path):
    rng = np.random.default_rng(4)
    write_dataset(tmp_path / "d", {"train": _split(10, 2, rng), "test": _split(4, 2, rng)}, name="d")
    np.save(tmp_path / "d" / "test" / "labels.npy", np.zeros((4, 3), dtype=np.int64))
    with pytest.raises(DataError, match="holds 3 factor columns but train/labels.npy holds 2"):
        read_dataset(tmp_path / "d")


def test_facetdigits_is_deterministic_balanced_and_independent():
    a = make_facetdigits_splits(n_train=400, n_valid=0, n_test=100, seed=5)
    b = make_facetdigits_splits(n_train=400, n_valid=0, n_test=100, seed=5)
    c = make_facetdigits_splits(n_train=400, n_valid=0, n_test=100, seed=6)
    assert set(a) == {"train", "test"}
    np.testing.assert_array_equal(a["train"].modalities[0], b["train"].modalities[0])
    assert not np.array_equal(a["train"].modalities[0], c["train"].modalities[0])
    x, y = a["train"].modalities[0], a["train"].labels
    assert x.shape == (400, 3, 28, 28) and x.dtype == np.uint8 and y.shape == (400, 2)
    assert set(y[:, 0]) == set(range(len(DIGITS))) and set(y[:, 1]) == set(range(len(STYLES)))
    # the colour factor is the background: the corner pixel's colour names it
    corner = x[:, :, 0, 0].astype(float)
    palette = np.array(list(STYLES.values()), dtype=float)
    nearest = np.argmin(((corner[:, None] - palette[None]) ** 2).sum(-1), axis=1)
    np.testing.assert_array_equal(nearest, y[:, 1])
    counts = np.histogram2d(y[:, 0], y[:, 1], bins=(len(DIGITS), len(STYLES)))[0]
    assert counts.min() > 0  # every combination occurs: the factors are drawn independently


def test_facetdigits_resolves_by_name_and_is_cached(tmp_path):
    root = resolve_dataset("facetdigits", data_root=tmp_path)
    data = read_dataset(root)
    assert data.factors == ["digit", "colour"] and data.name == "facetdigits"
    stamp = (root / "train" / "m0.npy").stat().st_mtime_ns
    assert resolve_dataset("facetdigits", data_root=tmp_path) == root
    assert (root / "train" / "m0.npy").stat().st_mtime_ns == stamp


def test_synth_writes_a_single_modality_folder(tmp_path):
    synth_facetdigits(tmp_path / "f", n_train=50, n_valid=10, n_test=20, seed=0)
    assert sorted(p.name for p in (tmp_path / "f" / "train").iterdir()) == ["labels.npy", "m0.npy"]
