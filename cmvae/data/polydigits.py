"""PolyDigits: a built-in, offline, PolyMNIST-like data set made from scikit-learn's bundled images.

Each modality draws its own handwritten 8x8 digit from ``load_digits()`` (upscaled to about 20x20 and
shifted by up to 2 px) onto a random 28x28 crop of its own background family, made from the bundled
``china.jpg``/``flower.jpg`` photos with a per-modality colour transform. Digit pixels take the inverted
background colour, as in PolyMNIST. Train/valid/test use disjoint pools of source digits, so test tuples
show handwriting the model has never seen.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal, overload

import numpy as np
from PIL import Image, ImageFilter

from cmvae_engine.cmvae.data.errors import DataError
from cmvae_engine.cmvae.data.format import IMAGE_SIZE, MultimodalSplit, write_dataset
from cmvae_engine.cmvae.progress import ProgressFn, report

# Bump whenever the generated arrays change for the same parameters: caches compare it (see resolve.py).
GENERATOR_VERSION = 1
MIN_MODALITIES, MAX_MODALITIES = 2, 8
N_CLASSES = 10
POOL_FRACTIONS = {"train": 0.7, "valid": 0.1}  # the rest of every class goes to test
GLYPH_SIZES = (18, 20, 22)
MAX_SHIFT = 2
_PAD = IMAGE_SIZE + 2 * MAX_SHIFT

Transform = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class _Family:
    name: str
    photo: str  # "china" or "flower"
    scale: float  # downscale of the 427x640 photo, so that a 28x28 crop shows texture, not a flat patch
    colour: Transform  # float HxWx3 in [0, 1] -> same
    blur: float = 0.0
    tiles: int = 0  # >0: mirror-tile the (tiny) photo into a tiles x tiles mosaic


def _gain(*g: float) -> Transform:
    return lambda x: x * np.array(g, dtype=np.float32)


def _perm(*p: int) -> Transform:
    return lambda x: x[..., list(p)]


def _then(*fs: Transform) -> Transform:
    def apply(x: np.ndarray) -> np.ndarray:
        for f in fs:
            x = f(x)
        return x

    return apply


def _grey(x: np.ndarray) -> np.ndarray:
    return np.repeat(x @ np.array([0.299, 0.587, 0.114], dtype=np.float32), 3).reshape(x.shape)


# Ordered so that the first M families are as different from each other as possible for every M.
FAMILIES: tuple[_Family, ...] = (
    _Family("china-warm", "china", 0.30, _gain(1.15, 0.85, 0.5)),
    _Family("flower-cool", "flower", 0.35, _then(_perm(2, 1, 0), lambda x: x**0.6, _gain(0.55, 0.9, 1.2))),
    _Family(
        "china-teal", "china", 0.25, _then(_perm(1, 2, 0), lambda x: (x - 0.5) * 1.4 + 0.45, _gain(0.3, 1, 1))
    ),
    _Family("flower-magenta", "flower", 0.30, _then(_perm(1, 0, 2), lambda x: x**0.5, _gain(1.2, 0.35, 1.1))),
    _Family("china-grey-blur", "china", 0.35, _then(_grey, lambda x: (x - 0.5) * 1.3 + 0.5), blur=1.2),
    _Family("flower-tiles", "flower", 0.08, _then(_perm(0, 2, 1), lambda x: x**0.5), tiles=4),
    _Family("china-negative-gold", "china", 0.30, _then(lambda x: 1.0 - x, _gain(1.25, 1.1, 0.35))),
    _Family("flower-pastel", "flower", 0.30, _then(_perm(2, 0, 1), lambda x: 0.55 + 0.45 * x**0.7)),
)


@dataclass
class PolyDigitsTrace:
    """How each tuple was made, for tests and inspection."""

    sources: dict[str, np.ndarray]  # split -> int64 [N, M]: index into load_digits() per modality
    masks: dict[str, np.ndarray]  # split -> bool [N, M, 28, 28]: the digit pixels
    pools: dict[str, np.ndarray]  # split -> sorted source indices the split may use


def generator_params(
    *, n_modalities: int = 5, n_train: int = 10000, n_valid: int = 1000, n_test: int = 2000, seed: int = 0
) -> dict[str, int | str]:
    """What goes under "generator" in the manifest; two data sets are identical iff these agree."""
    return {
        "kind": "polydigits",
        "version": GENERATOR_VERSION,
        "n_modalities": n_modalities,
        "n_train": n_train,
        "n_valid": n_valid,
        "n_test": n_test,
        "seed": seed,
    }


def synth_polydigits(
    dst: str | Path,
    *,
    n_modalities: int = 5,
    n_train: int = 10000,
    n_valid: int = 1000,
    n_test: int = 2000,
    seed: int = 0,
    progress: ProgressFn | None = None,
) -> Path:
    """Generate PolyDigits and write it to ``dst`` in our format (``progress``: see make_polydigits_splits; the
    write is its last unit)."""
    splits = make_polydigits_splits(
        n_modalities=n_modalities, n_train=n_train, n_valid=n_valid, n_test=n_test, seed=seed, progress=progress
    )
    path = write_dataset(
        dst,
        splits,
        name="polydigits",
        modality_names=[f"m{k}-{f.name}" for k, f in enumerate(FAMILIES[:n_modalities])],
        label_names=[str(c) for c in range(N_CLASSES)],
        extra={
            "generator": generator_params(
                n_modalities=n_modalities, n_train=n_train, n_valid=n_valid, n_test=n_test, seed=seed
            )
        },
    )
    total = _work_units(n_modalities, n_valid)
    report(progress, total, total)
    return path


@overload
def make_polydigits_splits(
    *,
    n_modalities: int = ...,
    n_train: int = ...,
    n_valid: int = ...,
    n_test: int = ...,
    seed: int = ...,
    progress: ProgressFn | None = ...,
    return_sources: Literal[False] = ...,
) -> dict[str, MultimodalSplit]: ...


@overload
def make_polydigits_splits(
    *,
    n_modalities: int = ...,
    n_train: int = ...,
    n_valid: int = ...,
    n_test: int = ...,
    seed: int = ...,
    progress: ProgressFn | None = ...,
    return_sources: Literal[True],
) -> tuple[dict[str, MultimodalSplit], PolyDigitsTrace]: ...


def make_polydigits_splits(
    *,
    n_modalities: int = 5,
    n_train: int = 10000,
    n_valid: int = 1000,
    n_test: int = 2000,
    seed: int = 0,
    progress: ProgressFn | None = None,
    return_sources: bool = False,
) -> dict[str, MultimodalSplit] | tuple[dict[str, MultimodalSplit], PolyDigitsTrace]:
    """Generate the splits in memory; ``valid`` is omitted when ``n_valid`` is 0.

    The same arguments give byte-identical arrays (one SeedSequence, one child stream per use). ``progress`` is
    called with (units done, total): the source images, then each (split, modality), then the write.
    """
    _check_args(n_modalities, n_train, n_valid, n_test)
    total, done = _work_units(n_modalities, n_valid), 0
    report(progress, done, total)
    digits, targets = _digits()
    pool_seq, *split_seqs = np.random.SeedSequence(seed).spawn(4)
    pools = _split_pools(targets, np.random.default_rng(pool_seq))
    glyphs = _glyph_bank(digits)
    backgrounds = [_background(f) for f in FAMILIES[:n_modalities]]
    done += 1
    report(progress, done, total)

    sizes = {"train": n_train, "valid": n_valid, "test": n_test}
    splits: dict[str, MultimodalSplit] = {}
    trace = PolyDigitsTrace({}, {}, pools)
    for (name, n), split_seq in zip(sizes.items(), split_seqs, strict=True):
        if n == 0:
            continue
        label_seq, *modality_seqs = split_seq.spawn(1 + n_modalities)
        label_rng = np.random.default_rng(label_seq)
        labels = label_rng.integers(0, N_CLASSES, size=n).astype(np.int64)
        sources = _draw_sources(labels, pools[name], targets, n_modalities, label_rng)
        images, masks = [], []
        for k, modality_seq in enumerate(modality_seqs):
            rng = np.random.default_rng(modality_seq)
            mask = _place_glyphs(glyphs, sources[:, k], rng)
            images.append(_compose(backgrounds[k], mask, rng))
            masks.append(mask)
            done += 1
            report(progress, done, total)
        splits[name] = MultimodalSplit(images, labels)
        trace.sources[name] = sources
        if return_sources:
            trace.masks[name] = np.stack(masks, axis=1)
    return (splits, trace) if return_sources else splits


def _work_units(n_modalities: int, n_valid: int) -> int:
    """Progress units of a synthesis: the sources, one per (split, modality), the write."""
    return 2 + n_modalities * (3 if n_valid else 2)


def _check_args(n_modalities: int, n_train: int, n_valid: int, n_test: int) -> None:
    if not MIN_MODALITIES <= n_modalities <= MAX_MODALITIES:
        raise DataError(
            f"polydigits supports {MIN_MODALITIES}..{MAX_MODALITIES} modalities, got {n_modalities}",
            fix=f"pass a number of modalities between {MIN_MODALITIES} and {MAX_MODALITIES}",
        )
    if n_train < 1 or n_test < 1 or n_valid < 0:
        raise DataError(
            f"split sizes must be n_train >= 1, n_valid >= 0, n_test >= 1 (got {n_train}, {n_valid}, "
            f"{n_test})",
            fix="pass positive sizes",
        )


# ---------------------------------------------------------------------------------------------- sources


@lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits  # deferred: importing sklearn costs ~1 s

    bunch = load_digits()
    return bunch.images.astype(np.float32) * (255.0 / 16.0), bunch.target.astype(np.int64)


def _split_pools(targets: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Partition source images per class (stratified) into disjoint train/valid/test pools."""
    pools: dict[str, list[np.ndarray]] = {"train": [], "valid": [], "test": []}
    for c in range(N_CLASSES):
        members = rng.permutation(np.flatnonzero(targets == c))
        n_train = int(round(len(members) * POOL_FRACTIONS["train"]))
        n_valid = int(round(len(members) * POOL_FRACTIONS["valid"]))
        pools["train"].append(members[:n_train])
        pools["valid"].append(members[n_train : n_train + n_valid])
        pools["test"].append(members[n_train + n_valid :])
    return {name: np.sort(np.concatenate(parts)) for name, parts in pools.items()}


def _draw_sources(
    labels: np.ndarray, pool: np.ndarray, targets: np.ndarray, n_modalities: int, rng: np.random.Generator
) -> np.ndarray:
    """[N, M] source indices: M different images of the tuple's class, all from ``pool``."""
    sources = np.empty((labels.size, n_modalities), dtype=np.int64)
    for c in range(N_CLASSES):
        members = pool[targets[pool] == c]
        rows = np.flatnonzero(labels == c)
        if members.size < n_modalities:
            raise DataError(
                f"class {c} has {members.size} source images in this pool, fewer than {n_modalities}",
                fix="use fewer modalities",
            )
        # Argsorting random keys per row draws M distinct members per tuple without a Python loop.
        order = np.argsort(rng.random((rows.size, members.size)), axis=1)[:, :n_modalities]
        sources[rows] = members[order]
    return sources


# ---------------------------------------------------------------------------------------------- digits


def _interp_matrix(n_out: int, n_in: int) -> np.ndarray:
    """[n_out, n_in] bilinear (half-pixel centres) resampling weights: up = A @ x @ A.T."""
    centres = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
    lo = np.floor(centres).astype(int)
    hi = np.minimum(lo + 1, n_in - 1)
    w = (centres - lo).astype(np.float32)
    a = np.zeros((n_out, n_in), dtype=np.float32)
    a[np.arange(n_out), lo] += 1 - w
    a[np.arange(n_out), hi] += w
    return a


def _glyph_bank(digits: np.ndarray) -> np.ndarray:
    """bool [n_src, len(GLYPH_SIZES), PAD, PAD]: each digit upscaled, thresholded at 128, centred."""
    bank = np.zeros((digits.shape[0], len(GLYPH_SIZES), _PAD, _PAD), dtype=bool)
    for j, size in enumerate(GLYPH_SIZES):
        a = _interp_matrix(size, digits.shape[1])
        up = np.einsum("yi,nij,xj->nyx", a, digits, a, optimize=True)
        top = (_PAD - size) // 2
        bank[:, j, top : top + size, top : top + size] = up > 128
    return bank


def _place_glyphs(glyphs: np.ndarray, sources: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """bool [N, 28, 28] digit masks: random glyph size and a shift of up to MAX_SHIFT px."""
    n = sources.size
    size_idx = rng.integers(0, len(GLYPH_SIZES), size=n)
    dy, dx = rng.integers(0, 2 * MAX_SHIFT + 1, size=(2, n))
    ar = np.arange(IMAGE_SIZE)
    rows = (dy[:, None] + ar)[:, :, None]
    cols = (dx[:, None] + ar)[:, None, :]
    return glyphs[sources[:, None, None], size_idx[:, None, None], rows, cols]


# ---------------------------------------------------------------------------------------------- backgrounds


@lru_cache(maxsize=2)
def _photo(name: str) -> Image.Image:
    from sklearn.datasets import load_sample_image  # deferred: importing sklearn costs ~1 s

    return Image.fromarray(load_sample_image(f"{name}.jpg"))


@lru_cache(maxsize=len(FAMILIES))
def _background(family: _Family) -> np.ndarray:
    """uint8 [H, W, 3] texture that the family's 28x28 crops come from."""
    photo = _photo(family.photo)
    w, h = photo.size
    image = photo.resize(
        (max(8, round(w * family.scale)), max(8, round(h * family.scale))), Image.Resampling.BOX
    )
    if family.blur:
        image = image.filter(ImageFilter.GaussianBlur(family.blur))
    x = np.asarray(image, dtype=np.float32) / 255.0
    if family.tiles:
        tile = np.concatenate([x, x[:, ::-1]], axis=1)
        tile = np.concatenate([tile, tile[::-1]], axis=0)
        x = np.tile(tile, (family.tiles // 2, family.tiles // 2, 1))
    x = family.colour(x)
    return np.round(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)


def _compose(background: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """uint8 [N, 3, 28, 28]: random crops of ``background`` with digit pixels inverted."""
    n = mask.shape[0]
    h, w, _ = background.shape
    y0 = rng.integers(0, h - IMAGE_SIZE + 1, size=n)
    x0 = rng.integers(0, w - IMAGE_SIZE + 1, size=n)
    ar = np.arange(IMAGE_SIZE)
    crops = background[(y0[:, None] + ar)[:, :, None], (x0[:, None] + ar)[:, None, :]]  # [N, 28, 28, 3]
    images = np.where(mask[..., None], 255 - crops, crops)
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2))
