"""PolyDigits: the built-in offline data set, its cache in resolve_dataset, and the data CLI."""

from __future__ import annotations

import functools
import itertools
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits
from typer.testing import CliRunner

from cmvae_engine.cmvae.data import DataError, default_data_root, make_polydigits_splits, read_dataset, resolve_dataset
from cmvae_engine.cmvae.data import polydigits as pd
from cmvae_engine.cmvae.data import resolve as rs
from cmvae_engine.engine.cli.data_cmd import data_app

SIZES = {"n_train": 200, "n_valid": 50, "n_test": 100}
TARGETS = load_digits().target


@pytest.fixture(scope="module")
def made():
    return make_polydigits_splits(n_modalities=4, seed=0, return_sources=True, **SIZES)


@pytest.fixture(scope="module")
def eight():
    return make_polydigits_splits(n_modalities=8, seed=0, return_sources=True, **SIZES)


def test_shapes_and_dtypes(made) -> None:
    splits, trace = made
    assert list(splits) == ["train", "valid", "test"]
    for name, split in splits.items():
        n = SIZES[f"n_{name}"]
        assert (split.n, split.n_modalities, split.image_shape) == (n, 4, (3, 28, 28))
        assert all(m.dtype == np.uint8 and m.flags.c_contiguous for m in split.modalities)
        assert split.labels is not None and split.labels.dtype == np.int64 and split.labels.shape == (n,)
        assert trace.sources[name].shape == (n, 4) and trace.masks[name].shape == (n, 4, 28, 28)


def test_same_seed_identical_other_seed_different(made) -> None:
    splits, _ = made
    again = make_polydigits_splits(n_modalities=4, seed=0, **SIZES)
    other = make_polydigits_splits(n_modalities=4, seed=1, **SIZES)
    for name in splits:
        for a, b, c in zip(
            splits[name].modalities, again[name].modalities, other[name].modalities, strict=True
        ):
            assert a.tobytes() == b.tobytes()
            assert not np.array_equal(a, c)
        assert np.array_equal(splits[name].labels, again[name].labels)


def test_pools_are_disjoint_stratified_and_used_as_declared(made) -> None:
    _, trace = made
    pools = trace.pools
    for a, b in itertools.combinations(pools.values(), 2):
        assert not set(a) & set(b)
    assert sorted(np.concatenate(list(pools.values()))) == list(range(len(TARGETS)))
    for name, fraction in (("train", 0.7), ("valid", 0.1), ("test", 0.2)):
        per_class = np.bincount(TARGETS[pools[name]], minlength=10) / np.bincount(TARGETS)
        assert np.allclose(per_class, fraction, atol=0.02)
    used = {name: set(s.ravel()) for name, s in trace.sources.items()}
    for name in used:
        assert used[name] <= set(pools[name])
    for a, b in itertools.combinations(used.values(), 2):
        assert not a & b


def test_tuples_show_different_images_of_the_label_class(made) -> None:
    splits, trace = made
    for name, split in splits.items():
        sources = trace.sources[name]
        assert (TARGETS[sources] == split.labels[:, None]).all()
        assert all(len(set(row)) == row.size for row in sources)
    counts = np.bincount(splits["train"].labels, minlength=10)
    assert counts.min() >= 8 and counts.max() <= 35  # uniform over 10 classes: 20 expected each


def test_backgrounds_differ_between_modalities(eight) -> None:
    splits, trace = eight
    split, masks = splits["train"], trace.masks["train"]
    means = [
        split.modalities[k].transpose(0, 2, 3, 1)[~masks[:, k]].mean(axis=0)
        for k in range(split.n_modalities)
    ]
    distances = [np.linalg.norm(a - b) for a, b in itertools.combinations(means, 2)]
    assert min(distances) > 25, np.round(means)


def test_digit_pixels_are_the_inverted_background(eight) -> None:
    splits, trace = eight
    split, masks = splits["train"], trace.masks["train"]
    for k in range(split.n_modalities):
        pixels = split.modalities[k].transpose(0, 2, 3, 1).astype(float)
        mask = masks[:, k]
        assert 0.08 < mask.mean() < 0.45  # a digit, neither empty nor the whole image
        # Crops and digits are independent, so digit pixels average to the inverted background average.
        assert np.abs(pixels[mask].mean(axis=0) - (255 - pixels[~mask].mean(axis=0))).max() < 20


def test_bad_arguments() -> None:
    with pytest.raises(DataError, match="2..8 modalities"):
        make_polydigits_splits(n_modalities=9)
    with pytest.raises(DataError, match="n_train >= 1"):
        make_polydigits_splits(n_train=0)


def test_no_valid_split_when_n_valid_is_zero() -> None:
    splits = make_polydigits_splits(n_modalities=2, n_train=20, n_valid=0, n_test=10)
    assert list(splits) == ["train", "test"]


# ------------------------------------------------------------------------------------------ writing, cache


@pytest.fixture
def small_defaults(monkeypatch):
    """resolve_dataset's cache logic with small sizes (default sizes take seconds)."""
    small = {"n_train": 30, "n_valid": 10, "n_test": 20}
    monkeypatch.setattr(rs, "synth_polydigits", functools.partial(pd.synth_polydigits, **small))
    monkeypatch.setattr(rs, "generator_params", functools.partial(pd.generator_params, **small))
    return small


def test_synth_writes_manifest_with_generator(tmp_path: Path) -> None:
    path = pd.synth_polydigits(tmp_path / "pd", n_modalities=3, n_train=30, n_valid=10, n_test=20, seed=4)
    data = read_dataset(path)
    assert data.name == "polydigits"
    assert data.modality_names == ["m0-china-warm", "m1-flower-cool", "m2-china-teal"]
    assert data.label_names == [str(c) for c in range(10)]
    assert data.extra["generator"] == pd.generator_params(
        n_modalities=3, n_train=30, n_valid=10, n_test=20, seed=4
    )
    direct = make_polydigits_splits(n_modalities=3, n_train=30, n_valid=10, n_test=20, seed=4)
    np.testing.assert_array_equal(data.split("valid").modalities[2], direct["valid"].modalities[2])


def test_resolve_synthesises_once_and_again_when_parameters_change(tmp_path, small_defaults, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="cmvae_engine.cmvae.data.resolve"):
        path = resolve_dataset("polydigits", data_root=tmp_path)
        assert path == tmp_path / "polydigits" and read_dataset(path).split("train").n == 30
        assert resolve_dataset("polydigits", data_root=tmp_path) == path
        assert sum("synthesising" in r.message for r in caplog.records) == 1
        resolve_dataset("polydigits", data_root=tmp_path, seed=1)
        assert read_dataset(path).extra["generator"]["seed"] == 1
        m3 = resolve_dataset("polydigits", data_root=tmp_path, n_modalities=3)
        assert m3 == tmp_path / "polydigits-m3" and read_dataset(m3).n_modalities == 3
    assert sum("synthesising" in r.message for r in caplog.records) == 3


def test_resolve_paths_and_unknown_names(tmp_path: Path, monkeypatch) -> None:
    assert resolve_dataset(str(tmp_path)) == tmp_path
    with pytest.raises(DataError) as info:
        resolve_dataset("polymnsit")
    assert "polymnsit" in str(info.value) and "polydigits, polymnist" in str(info.value)
    monkeypatch.setenv("CMVAE_DATA_DIR", str(tmp_path / "elsewhere"))
    assert default_data_root() == tmp_path / "elsewhere"
    monkeypatch.delenv("CMVAE_DATA_DIR")
    monkeypatch.chdir(tmp_path)
    assert default_data_root() == tmp_path / "data"


# ---------------------------------------------------------------------------------------------- CLI


def test_cli_synth_info_grid(tmp_path: Path) -> None:
    runner, out = CliRunner(), tmp_path / "pd"
    args = ["--modalities", "3", "--n-train", "30", "--n-valid", "10", "--n-test", "20", "--seed", "2"]
    result = runner.invoke(data_app, ["synth", "polydigits", "--out", str(out), *args])
    assert result.exit_code == 0, result.output
    assert read_dataset(out).extra["generator"]["seed"] == 2

    result = runner.invoke(data_app, ["info", str(out)])
    assert result.exit_code == 0, result.output
    for text in ("polydigits", "m2-china-teal", "train", "valid", "test", "(3, 28, 28)"):
        assert text in result.output

    png = tmp_path / "look" / "grid.png"
    result = runner.invoke(
        data_app, ["grid", str(out), "--out", str(png), "--n", "4", "--split", "test", "--scale", "1"]
    )
    assert result.exit_code == 0, result.output
    picture = np.asarray(Image.open(png))
    assert picture.shape == (2 + 4 * 30, 2 + 3 * 30, 3)
    first_test = read_dataset(out).split("test").modalities[1][0].transpose(1, 2, 0)
    np.testing.assert_array_equal(picture[2:30, 32:60], first_test)


def test_cli_errors_exit_2_with_clean_message(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(data_app, ["synth", "mnist-ish", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "unknown synthetic data set 'mnist-ish'" in result.stderr
    assert "Traceback" not in result.output
    result = runner.invoke(data_app, ["grid", str(tmp_path / "none"), "--out", str(tmp_path / "g.png")])
    assert result.exit_code == 2 and "cmvae-engine data synth polydigits" in result.stderr
    pd.synth_polydigits(tmp_path / "pd", n_modalities=2, n_train=20, n_valid=0, n_test=10)
    result = runner.invoke(
        data_app, ["grid", str(tmp_path / "pd"), "--out", str(tmp_path / "g.png"), "--split", "valid"]
    )
    assert result.exit_code == 2 and "no valid split" in result.stderr
