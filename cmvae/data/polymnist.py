"""Reader and converter for the real PolyMNIST layout ``{src}/{train,test}/m{k}/{i}.{digit}.png``."""

from __future__ import annotations

import multiprocessing
import os
import re
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from cmvae_engine.cmvae.data.errors import DataError
from cmvae_engine.cmvae.data.format import IMAGE_SIZE, MultimodalSplit, write_dataset
from cmvae_engine.cmvae.progress import ProgressFn, report

VALID_INDICES = "valid_PMtest_indices.npy"
TEST_INDICES = "test_PMtest_indices.npy"
VALID_FRACTION = 0.1
_NAME = re.compile(r"^(\d+)\.(\d+)\.png$")
_MODALITY_DIR = re.compile(r"^m(0|[1-9][0-9]*)$")
_GET_POLYMNIST = (
    "download the PolyMNIST zip published by the authors of 'Generalized Multimodal ELBO' (MoPoE-VAE) on a "
    "machine with internet access and unzip it so that {src}/train/m0/0.5.png exists; nothing is downloaded "
    "at run time"
)
_REPLACE = "re-extract this file from the PolyMNIST zip, or remove the whole tuple from every modality"


def read_polymnist(
    src: str | Path, *, seed: int = 0, workers: int | None = None, progress: ProgressFn | None = None
) -> dict[str, MultimodalSplit]:
    """Read PolyMNIST into ``train``, ``valid`` and ``test`` splits.

    Tuples are ordered by sorted file name (tuple index, then name) so that results do not depend on the
    file system's listing order. ``valid`` comes from the index files when present (they index the sorted
    test set), else from a seeded 10% of train. ``workers``: decoding processes (None: one per available
    core for large sets, 0 or 1: decode in this process). ``progress``: called with (images decoded, total).
    """
    src = Path(src)
    if not (src / "train").is_dir() or not (src / "test").is_dir():
        missing = src if not src.exists() else src / ("train" if not (src / "train").is_dir() else "test")
        raise DataError("PolyMNIST folder not found", path=missing, fix=_GET_POLYMNIST.format(src=src))
    # Every name is checked before any image is decoded, so layout mistakes surface in a second, not minutes.
    listings = {split: _list_split(src / split) for split in ("train", "test")}
    n_train_modalities, n_test_modalities = (len(listings[s][0]) for s in ("train", "test"))
    if n_train_modalities != n_test_modalities:
        raise DataError(
            f"test has {n_test_modalities} modality folders but train has {n_train_modalities}",
            path=src / "test",
            fix="both splits need the folders m0..m{M-1}; re-extract PolyMNIST",
        )
    index_files = _find_index_files(src)
    held_out = (
        None if index_files is None else _load_index_files(*index_files, n_test=len(listings["test"][1]))
    )
    paths = [str(d / name) for dirs, names, _ in listings.values() for d in dirs for name in names]
    pixels = _decode_all(paths, workers, progress)
    splits, start = {}, 0
    for split, (dirs, names, labels) in listings.items():
        size = len(dirs) * len(names)
        block = pixels[start : start + size].reshape(len(dirs), len(names), 3, IMAGE_SIZE, IMAGE_SIZE)
        splits[split] = MultimodalSplit(list(block), labels)
        start += size
    train, test = splits["train"], splits["test"]

    if held_out is not None:
        valid_idx, test_idx = held_out
        return {"train": train, "valid": test.subset(valid_idx), "test": test.subset(test_idx)}
    valid_mask = _holdout_mask(train.n, VALID_FRACTION, seed)
    return {
        "train": train.subset(np.flatnonzero(~valid_mask)),
        "valid": train.subset(np.flatnonzero(valid_mask)),
        "test": test,
    }


def convert_polymnist(src: str | Path, dst: str | Path, *, seed: int = 0, workers: int | None = None,
                      progress: ProgressFn | None = None) -> Path:
    """Read PolyMNIST from ``src`` and write it to ``dst`` in our format (``progress``: images decoded)."""
    splits = read_polymnist(src, seed=seed, workers=workers, progress=progress)
    n_modalities = splits["train"].n_modalities
    return write_dataset(
        dst,
        splits,
        name="polymnist",
        modality_names=[f"m{k}" for k in range(n_modalities)],
        label_names=[str(d) for d in range(10)],
        extra={"source": {"kind": "polymnist", "path": str(Path(src).resolve()), "seed": seed}},
    )


def _holdout_mask(n: int, fraction: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mask = np.zeros(n, dtype=bool)
    mask[rng.permutation(n)[: int(round(n * fraction))]] = True
    return mask


# ---------------------------------------------------------------------------------------------- listing


def _modality_dirs(split_dir: Path) -> list[Path]:
    found = sorted(
        (int(m.group(1)), p) for p in split_dir.iterdir() if p.is_dir() and (m := _MODALITY_DIR.match(p.name))
    )
    indices = [k for k, _ in found]
    if not indices or indices != list(range(len(indices))):
        raise DataError(
            f"expected modality folders m0, m1, ... (no gaps), found {[p.name for _, p in found] or 'none'}",
            path=split_dir,
            fix=_GET_POLYMNIST.format(src=split_dir.parent),
        )
    return [p for _, p in found]


def _sort_key(name: str) -> tuple[int, str]:
    return int(name.split(".", 1)[0]), name


def _list_tuples(modality_dirs: list[Path]) -> tuple[list[str], np.ndarray]:
    per_modality = [{e.name for e in os.scandir(d) if e.name.endswith(".png")} for d in modality_dirs]
    for directory, names in zip(modality_dirs, per_modality, strict=True):
        for name in sorted(names):
            if not _NAME.match(name):
                raise DataError(
                    "file name does not match the PolyMNIST pattern {index}.{digit}.png",
                    path=directory / name,
                    fix="rename or remove this file (the label comes from the name: 17.3.png is digit 3)",
                )
    everything = set().union(*per_modality)
    for directory, names in zip(modality_dirs, per_modality, strict=True):
        missing = sorted(everything - names, key=_sort_key)
        if missing:
            shown = ", ".join(str(directory / n) for n in missing[:5])
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise DataError(
                f"modality {directory.name} lacks {len(missing)} file(s) present in other modalities: "
                f"{shown}{more}",
                path=directory,
                fix="a tuple is the same file name in every modality folder: " + _REPLACE,
            )
    names = sorted(everything, key=_sort_key)
    labels = np.array([int(n.split(".")[-2]) for n in names], dtype=np.int64)
    return names, labels


# ---------------------------------------------------------------------------------------------- decoding


def _list_split(split_dir: Path) -> tuple[list[Path], list[str], np.ndarray]:
    modality_dirs = _modality_dirs(split_dir)
    names, labels = _list_tuples(modality_dirs)
    if not names:
        raise DataError(
            "no PNG files in the modality folders",
            path=split_dir,
            fix=_GET_POLYMNIST.format(src=split_dir.parent),
        )
    return modality_dirs, names, labels


# Below this many files, starting processes costs more than it saves.
_PARALLEL_FROM = 20_000
_CHUNK = 2048


def _available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _decode_all(paths: list[str], workers: int | None, progress: ProgressFn | None = None) -> np.ndarray:
    """uint8 [len(paths), 3, 28, 28].

    Processes, not threads: a 28x28 PNG decodes in ~0.03 ms but costs ~0.1 ms of Python around it, so
    threads serialise on the GIL (measured: 2 threads were 1.7x slower than 1 on a 2-core machine).
    """
    if workers is None:
        workers = _available_cores() if len(paths) >= _PARALLEL_FROM else 1
    out = np.empty((len(paths), 3, IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    chunks = [paths[i : i + _CHUNK] for i in range(0, len(paths), _CHUNK)]
    if workers <= 1:
        _fill(out, map(_decode_chunk, chunks), progress)
        return out
    # spawn: the parent may hold torch's threads, which fork would copy in an unknown state.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        _fill(out, pool.map(_decode_chunk, chunks), progress)
    return out


def _fill(out: np.ndarray, blocks: Iterable[np.ndarray], progress: ProgressFn | None = None) -> None:
    start = 0
    for block in blocks:
        out[start : start + len(block)] = block
        start += len(block)
        report(progress, start, len(out))


def _decode_chunk(paths: list[str]) -> np.ndarray:
    out = np.empty((len(paths), 3, IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    for i, path in enumerate(paths):
        out[i] = _decode(Path(path))
    return out


def _decode(path: Path) -> np.ndarray:
    try:
        with Image.open(path, formats=("PNG",)) as image:
            image.load()
            size, mode = image.size, image.mode
            if size == (IMAGE_SIZE, IMAGE_SIZE) and mode == "RGB":
                return np.asarray(image).transpose(2, 0, 1)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise DataError(f"cannot be decoded as an image ({err})", path=path, fix=_REPLACE) from err
    channels = len(Image.new(mode, (1, 1)).getbands())
    raise DataError(
        f"image is {size[0]}x{size[1]} with mode {mode} ({channels} channel(s)); "
        f"expected {IMAGE_SIZE}x{IMAGE_SIZE}x3 RGB",
        path=path,
        fix=_REPLACE,
    )


# ---------------------------------------------------------------------------------------------- index files


def _find_index_files(src: Path) -> tuple[Path, Path] | None:
    for folder in (src, src / "test"):
        valid, test = folder / VALID_INDICES, folder / TEST_INDICES
        if valid.exists() and test.exists():
            return valid, test
        if valid.exists() != test.exists():
            present, absent = (valid, test) if valid.exists() else (test, valid)
            raise DataError(
                f"found without its partner {absent.name}",
                path=present,
                fix=f"put both {VALID_INDICES} and {TEST_INDICES} next to each other, or remove it",
            )
    return None


def _load_index_files(valid_path: Path, test_path: Path, *, n_test: int) -> tuple[np.ndarray, np.ndarray]:
    loaded = []
    for path in (valid_path, test_path):
        fix = f"it must be a 1-D integer array of distinct indices into the {n_test} sorted test tuples"
        try:
            idx = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as err:
            raise DataError(f"cannot be read as a .npy array ({err})", path=path, fix=fix) from err
        if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer):
            raise DataError(f"has shape {idx.shape} and dtype {idx.dtype}", path=path, fix=fix)
        if idx.size and (idx.min() < 0 or idx.max() >= n_test):
            raise DataError(
                f"indices span {idx.min()}..{idx.max()}, outside 0..{n_test - 1}", path=path, fix=fix
            )
        if np.unique(idx).size != idx.size:
            raise DataError("has repeated indices", path=path, fix=fix)
        loaded.append(idx.astype(np.int64))
    if np.intersect1d(*loaded).size:
        raise DataError(
            f"shares indices with {test_path.name}",
            path=valid_path,
            fix="validation and test indices must be disjoint",
        )
    return loaded[0], loaded[1]
