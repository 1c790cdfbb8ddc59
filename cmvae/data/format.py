"""Our on-disk format for multimodal image data sets, with a reader that validates everything.

Layout::

    {root}/manifest.json          optional: name, modalities, label_names, plus free extra keys
    {root}/{split}/m{k}.npy       uint8 [N, C, H, W], one file per modality, same N in all
                                  (a `text` modality: integer token ids [N, L]; see kinds.py)
    {root}/{split}/labels.npy     optional integer [N], or [N, F] for F labelled factors (names: manifest "factors")
    {root}/{vocab}                the vocabulary file of each text modality (manifest `modality_specs`)

with splits ``train`` and ``test`` required and ``valid`` optional.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from cmvae_engine.cmvae.data.errors import DataError
from cmvae_engine.cmvae.data.kinds import IMAGE_SIZES, SPECS_FIELD, ModalitySpec, check_text, parse_specs, read_vocab

SPLITS = ("train", "valid", "test")
REQUIRED_SPLITS = ("train", "test")
IMAGE_SIZE = 28
MANIFEST = "manifest.json"
FORMAT_VERSION = 1
_MODALITY_FILE = re.compile(r"^m(0|[1-9][0-9]*)\.npy$")
_KNOWN_MANIFEST_KEYS = {"name", "modalities", "label_names", "format_version", "factors", SPECS_FIELD}

CREATE_HINT = (
    "create a data set with `cmvae-engine data synth polydigits` (built in, offline) or "
    "`cmvae-engine data convert polymnist SRC DST` (from the unzipped PolyMNIST), then pass its folder"
)
_RECREATE = "re-create the data set (`cmvae-engine data synth ...` / `data convert ...`) or repair this file"


@dataclass
class MultimodalSplit:
    """One split: M aligned image arrays (tuple i is row i of every modality) and optional labels."""

    modalities: list[np.ndarray]
    labels: np.ndarray | None = None

    @property
    def n(self) -> int:
        return int(self.modalities[0].shape[0])

    @property
    def n_modalities(self) -> int:
        return len(self.modalities)

    @property
    def image_shapes(self) -> list[tuple[int, ...]]:
        """C x H x W of each image modality (L of a text modality)."""
        return [tuple(int(s) for s in m.shape[1:]) for m in self.modalities]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        shapes = set(self.image_shapes)
        if len(shapes) != 1:
            raise ValueError(f"modalities have different image shapes {self.image_shapes}; use image_shapes")
        return shapes.pop()

    def subset(self, index: np.ndarray) -> MultimodalSplit:
        """Tuples at ``index`` (copies: fancy indexing never returns a view)."""
        labels = None if self.labels is None else self.labels[index]
        return MultimodalSplit([m[index] for m in self.modalities], labels)


@dataclass
class MultimodalDataset:
    root: Path
    name: str
    modality_names: list[str]
    label_names: list[str] | None
    splits: dict[str, MultimodalSplit]
    # Manifest keys we do not interpret ourselves, e.g. polydigits' "generator" parameters.
    extra: dict[str, Any] = field(default_factory=dict)
    factors: list[str] | None = None
    """Names of the labelled factors, one per column of labels.npy (None: the data set has no labels)."""
    specs: list[ModalitySpec] | None = None
    """Kind (and likelihood settings) of each modality; None: all images (a manifest without `modality_specs`)."""
    vocabs: dict[int, list[str]] = field(default_factory=dict)
    """Words by token id of each text modality (by modality index)."""

    @property
    def modality_specs(self) -> list[ModalitySpec]:
        return self.specs if self.specs is not None else [ModalitySpec() for _ in self.modality_names]

    def split(self, name: str) -> MultimodalSplit:
        if name not in self.splits:
            present = ", ".join(self.splits) or "none"
            fix = (
                f"use one of the present splits ({present})"
                if name in SPLITS
                else f"split names are {', '.join(SPLITS)}"
            )
            raise DataError(f"no {name} split in {self.root} (present: {present})", fix=fix)
        return self.splits[name]

    @property
    def n_modalities(self) -> int:
        return len(self.modality_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.splits["train"].image_shape


# ---------------------------------------------------------------------------------------------- writing


def write_dataset(
    root: str | Path,
    splits: dict[str, MultimodalSplit],
    *,
    name: str,
    modality_names: list[str] | None = None,
    label_names: list[str] | None = None,
    extra: dict[str, Any] | None = None,
    factors: list[str] | None = None,
    specs: list[ModalitySpec] | None = None,
    vocabs: dict[int, list[str]] | None = None,
) -> Path:
    """Write ``splits`` under ``root`` in our format and return ``root``.

    Every file is replaced atomically and the manifest goes last (after the old one is removed first), so
    a reader never sees a manifest describing half-written arrays: an interrupted write leaves a folder
    without manifest, which the cache checks in ``resolve`` treat as stale.
    """
    root = Path(root)
    vocabs = vocabs or {}
    if vocabs and specs is None:
        raise DataError("vocabularies given without modality specs", fix="pass specs with a text spec per vocabulary")
    if specs is not None:
        for k, spec in enumerate(specs):
            if spec.kind == "text" and k not in vocabs:
                raise DataError(f"text modality m{k} has no vocabulary", fix="pass its words as vocabs={k: [...]}")
    n_modalities = _check_splits_to_write(splits, specs, {k: len(v) for k, v in vocabs.items()})
    if specs is not None and len(specs) != n_modalities:
        raise DataError(f"{len(specs)} modality specs given for {n_modalities} modalities",
                        fix="pass one spec per modality array")
    modality_names = list(modality_names) if modality_names is not None else _default_names(n_modalities)
    if len(modality_names) != n_modalities:
        raise DataError(
            f"{len(modality_names)} modality names given for {n_modalities} modalities",
            fix="pass one name per modality array",
        )
    if factors is not None:
        check_factors(splits, factors, root)
    reserved = _KNOWN_MANIFEST_KEYS & set(extra or {})
    if reserved:
        raise DataError(
            f"extra manifest keys {sorted(reserved)} clash with the format's own keys",
            fix="rename those extra keys",
        )

    root.mkdir(parents=True, exist_ok=True)
    manifest_path = root / MANIFEST
    manifest_path.unlink(missing_ok=True)
    for split_name in SPLITS:
        split_dir = root / split_name
        if split_name in splits:
            _write_split(split_dir, splits[split_name])
        elif split_dir.is_dir():
            _remove_our_files(split_dir, keep=set())
            with contextlib.suppress(OSError):  # not empty: someone else's files, leave them
                split_dir.rmdir()

    for k, words in vocabs.items():
        vocab_text = json.dumps(list(words)) + "\n"
        _atomic_write(root / specs[k].vocab, lambda f, t=vocab_text: f.write(t.encode()))
    manifest: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "name": name,
        "modalities": modality_names,
        "label_names": None if label_names is None else list(label_names),
        **({} if factors is None else {"factors": list(factors)}),
        **({SPECS_FIELD: [s.to_manifest() for s in specs]} if specs is not None else {}),
        **(extra or {}),
    }
    text = json.dumps(manifest, indent=2) + "\n"
    _atomic_write(manifest_path, lambda f: f.write(text.encode()))
    return root


def _write_split(split_dir: Path, split: MultimodalSplit) -> None:
    split_dir.mkdir(parents=True, exist_ok=True)
    written = set()
    for k, array in enumerate(split.modalities):
        path = split_dir / f"m{k}.npy"
        _atomic_write(path, lambda f, a=array: np.save(f, np.ascontiguousarray(a), allow_pickle=False))
        written.add(path.name)
    if split.labels is not None:
        labels = np.asarray(split.labels, dtype=np.int64)
        _atomic_write(split_dir / "labels.npy", lambda f: np.save(f, labels, allow_pickle=False))
        written.add("labels.npy")
    # Leftovers of an earlier write with more modalities (or with labels) would otherwise be read back.
    _remove_our_files(split_dir, keep=written)


def _remove_our_files(split_dir: Path, keep: set[str]) -> None:
    for path in split_dir.iterdir():
        ours = _MODALITY_FILE.match(path.name) or path.name == "labels.npy"
        if ours and path.name not in keep:
            path.unlink()


def _atomic_write(path: Path, write: Callable[[IO[bytes]], object]) -> None:
    # A unique name in the same folder makes os.replace atomic; open(..., "x") (not mkstemp) keeps the
    # umask-derived permissions, so the final file is as readable as any other.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "xb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _check_splits_to_write(splits: dict[str, MultimodalSplit], specs: list[ModalitySpec] | None = None,
                           vocab_sizes: dict[int, int] | None = None) -> int:
    unknown = sorted(set(splits) - set(SPLITS))
    if unknown:
        raise DataError(f"unknown split names {unknown}", fix=f"use only {', '.join(SPLITS)}")
    missing = [s for s in REQUIRED_SPLITS if s not in splits]
    if missing:
        raise DataError(f"splits {missing} missing", fix="every data set needs a train and a test split")
    n_modalities = splits["train"].n_modalities
    if n_modalities == 0:
        raise DataError("the train split has no modalities", fix="pass at least one image array")
    for split_name, split in splits.items():
        where = Path(split_name)
        if split.n_modalities != n_modalities:
            raise DataError(
                f"{split.n_modalities} modalities, train has {n_modalities}",
                path=where,
                fix="give every split the same modalities",
            )
        for k, array in enumerate(split.modalities):
            if specs is not None and k < len(specs) and specs[k].kind == "text":
                check_text(np.asarray(array), where / f"m{k}.npy", (vocab_sizes or {})[k], Path(specs[k].vocab))
            else:
                _check_images(array, where / f"m{k}.npy")
            _check_same_n(array, split.modalities[0], where / f"m{k}.npy")
            _check_same_image_shape(array, splits["train"].modalities[k], where / f"m{k}.npy")
        if split.labels is not None:
            _check_labels(np.asarray(split.labels), split.n, where / "labels.npy")
    return n_modalities


def _default_names(n_modalities: int) -> list[str]:
    return [f"m{k}" for k in range(n_modalities)]


# ---------------------------------------------------------------------------------------------- reading


def read_manifest(root: str | Path) -> dict[str, Any] | None:
    """The validated manifest of ``root``, or None when it has none (manifests are optional)."""
    path = Path(root) / MANIFEST
    if not path.is_file():
        return None
    fix_json = (
        f"correct {MANIFEST} or delete it (it is optional: without it the modalities are the m*.npy files)"
    )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataError(f"not valid JSON ({err})", path=path, fix=fix_json) from err
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"cannot be read ({err})", path=path, fix=fix_json) from err
    if not isinstance(manifest, dict):
        raise DataError(f"must hold a JSON object, found {type(manifest).__name__}", path=path, fix=fix_json)
    if "name" in manifest and not isinstance(manifest["name"], str):
        raise DataError("field `name` must be a string", path=path, fix='write e.g. "name": "polymnist"')
    for key in ("modalities", "label_names", "factors"):
        value = manifest.get(key)
        if value is None:
            continue
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise DataError(
                f"field `{key}` must be a list of strings",
                path=path,
                fix=f'write e.g. "{key}": ["a", "b"] or remove the field',
            )
        if len(set(value)) != len(value):
            raise DataError(
                f"field `{key}` has duplicate names {value}", path=path, fix="make the names unique"
            )
    parse_specs(manifest.get(SPECS_FIELD), None, path)
    return manifest


def read_dataset(root: str | Path, *, mmap: bool = False) -> MultimodalDataset:
    """Read and validate a data set in our format; ``mmap`` maps the image files instead of loading them."""
    root = Path(root)
    if not root.is_dir():
        raise DataError("data set folder does not exist", path=root, fix=CREATE_HINT)
    manifest = read_manifest(root)
    for split_name in REQUIRED_SPLITS:
        if not (root / split_name).is_dir():
            raise DataError(
                f"the {split_name} split folder is missing",
                path=root / split_name,
                fix=f"every data set needs train/ and test/ holding m0.npy, m1.npy, ...; {CREATE_HINT}",
            )

    n_modalities = _count_modalities(root, manifest)
    specs = parse_specs((manifest or {}).get(SPECS_FIELD), n_modalities, root / MANIFEST)
    vocabs = {k: read_vocab(root / s.vocab) for k, s in enumerate(specs or []) if s.kind == "text"}
    for k, words in vocabs.items():
        for key in ("pad_id", "end_id"):
            token = getattr(specs[k], key)
            if token >= len(words):
                raise DataError(f"field `{SPECS_FIELD}[{k}]`: `{key}` {token} is outside the vocabulary "
                                f"({len(words)} words in {root / specs[k].vocab})", path=root / MANIFEST,
                                fix=f"give the id of the {key[:-3]} token in that vocabulary")
    text = {k: (len(words), root / specs[k].vocab) for k, words in vocabs.items()}
    splits: dict[str, MultimodalSplit] = {}
    for split_name in SPLITS:
        if (root / split_name).is_dir():
            splits[split_name] = _read_split(root / split_name, n_modalities, mmap, splits.get("train"), text)

    label_names = None if manifest is None else manifest.get("label_names")
    if label_names is not None:
        for split_name, split in splits.items():
            _check_label_names(split, label_names, root / split_name / "labels.npy", root / MANIFEST)
    factors = check_factors(splits, None if manifest is None else manifest.get("factors"), root)
    names = None if manifest is None else manifest.get("modalities")
    return MultimodalDataset(
        root=root,
        name=(manifest or {}).get("name") or root.name,
        modality_names=list(names) if names is not None else _default_names(n_modalities),
        label_names=label_names,
        splits=splits,
        extra={k: v for k, v in (manifest or {}).items() if k not in _KNOWN_MANIFEST_KEYS},
        factors=factors,
        specs=specs,
        vocabs=vocabs,
    )


def _modality_indices(split_dir: Path) -> list[int]:
    found = (_MODALITY_FILE.match(p.name) for p in split_dir.iterdir())
    return sorted(int(m.group(1)) for m in found if m)


def _count_modalities(root: Path, manifest: dict[str, Any] | None) -> int:
    train = root / "train"
    found = _modality_indices(train)
    if not found:
        raise DataError(
            "no modality files (m0.npy, m1.npy, ...) in the train split",
            path=train,
            fix=f"put one uint8 N x C x H x W array per modality there; {CREATE_HINT}",
        )
    names = None if manifest is None else manifest.get("modalities")
    if names is not None and len(names) != len(found):
        files = ", ".join(f"m{k}.npy" for k in found)
        raise DataError(
            f"field `modalities` lists {len(names)} modalities but {train} holds {len(found)} ({files})",
            path=root / MANIFEST,
            fix="list one name per m{k}.npy file in `modalities` (order m0, m1, ...) or re-create the set",
        )
    return len(found)


def _read_split(
    split_dir: Path, n_modalities: int, mmap: bool, train: MultimodalSplit | None,
    text: dict[int, tuple[int, Path]] | None = None,
) -> MultimodalSplit:
    found = _modality_indices(split_dir)
    expected = list(range(n_modalities))
    if found != expected:
        missing = [f"m{k}.npy" for k in expected if k not in found]
        extra = [f"m{k}.npy" for k in found if k >= n_modalities]
        problem = (
            f"modality files missing: {', '.join(missing)}"
            if missing
            else f"unexpected modality files {', '.join(extra)}"
        )
        where = split_dir / (missing[0] if missing else extra[0])
        raise DataError(
            f"{problem} (expected m0.npy..m{n_modalities - 1}.npy, as in train/ and the manifest)",
            path=where,
            fix="every split needs the same modality files m0.npy..m{M-1}.npy; add or remove files, or "
            + _RECREATE,
        )
    modalities = []
    for k in expected:
        path = split_dir / f"m{k}.npy"
        array = _load(path, mmap)
        if text and k in text:
            check_text(array, path, *text[k])
        else:
            _check_images(array, path)
        if modalities:
            _check_same_n(array, modalities[0], path)
        if train is not None:
            _check_same_image_shape(array, train.modalities[k], path)
        modalities.append(array)

    labels = None
    labels_path = split_dir / "labels.npy"
    if labels_path.exists():
        raw = _load(labels_path, mmap=False)
        _check_labels(raw, modalities[0].shape[0], labels_path)
        labels = raw.astype(np.int64, copy=False)
    return MultimodalSplit(modalities, labels)


def _load(path: Path, mmap: bool) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        raise DataError(
            f"cannot be read as a .npy array ({err})",
            path=path,
            fix="write it with numpy.save (no pickled objects); " + _RECREATE,
        ) from err


# ---------------------------------------------------------------------------------------------- checks


def _check_images(array: np.ndarray, path: Path) -> None:
    if array.dtype != np.uint8:
        raise DataError(
            f"images have dtype {array.dtype}, expected uint8",
            path=path,
            fix="store pixels as uint8 0..255, e.g. np.round(x * 255).astype(np.uint8) for x in [0, 1]",
        )
    if array.ndim != 4:
        raise DataError(
            f"images have shape {tuple(array.shape)} ({array.ndim}-D), expected 4-D N x C x H x W",
            path=path,
            fix="add a channel axis (x[:, None]) to grey images; make N x H x W x C x.transpose(0, 3, 1, 2)",
        )
    if array.shape[2] != array.shape[3] or array.shape[2] not in IMAGE_SIZES:
        sizes = ", ".join(f"{s}x{s}" for s in IMAGE_SIZES)
        raise DataError(
            f"images are {array.shape[2]}x{array.shape[3]} (shape {tuple(array.shape)}); the networks "
            f"support square images of {sizes}",
            path=path,
            fix=f"resize the images to one of {sizes} (and check the axes are N x C x H x W); captions: declare "
                f'the modality "kind": "text" in the manifest\'s `{SPECS_FIELD}`',
        )


def _check_same_n(array: np.ndarray, first: np.ndarray, path: Path) -> None:
    if array.shape[0] != first.shape[0]:
        raise DataError(
            f"holds {array.shape[0]} tuples but m0.npy of the same split holds {first.shape[0]}",
            path=path,
            fix="row i of every modality file is tuple i: give all modality files of a split the same N",
        )


def _check_same_image_shape(array: np.ndarray, train: np.ndarray, path: Path) -> None:
    if array.shape[1:] != train.shape[1:]:
        raise DataError(
            f"image shape C x H x W = {tuple(array.shape[1:])} differs from the train split's "
            f"{tuple(train.shape[1:])}",
            path=path,
            fix="a modality must have the same channels and size in every split; convert it to match train",
        )


def _check_labels(labels: np.ndarray, n: int, path: Path) -> None:
    if labels.ndim not in (1, 2) or (labels.ndim == 2 and labels.shape[1] < 1) \
            or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(
            f"labels have shape {tuple(labels.shape)} and dtype {labels.dtype}, expected an integer array of shape "
            "(N,) (one factor) or (N, F) (F labelled factors)",
            path=path,
            fix="save class indices, e.g. np.save(path, y.astype(np.int64).ravel()), or one column per factor "
                "(np.stack([y0, y1], axis=1)) with their names in the manifest's `factors`; or delete labels.npy",
        )
    if labels.shape[0] != n:
        raise DataError(
            f"holds {labels.shape[0]} labels but the split's modality files hold {n} tuples",
            path=path,
            fix="save exactly one label per tuple, or delete labels.npy",
        )
    if labels.size and labels.min() < 0:
        raise DataError(
            f"has negative labels (min {labels.min()})",
            path=path,
            fix="use class indices 0..K-1 (unlabelled data: delete labels.npy)",
        )


def _check_label_names(
    split: MultimodalSplit, label_names: list[str], labels_path: Path, manifest: Path
) -> None:
    if split.labels is None or split.labels.size == 0 or split.labels.ndim == 2:  # names of factor 0's classes only
        return
    top = int(split.labels.max())
    if top >= len(label_names):
        raise DataError(
            f"label {top} has no name: {manifest} field `label_names` lists {len(label_names)} names",
            path=labels_path,
            fix="list one name per class in `label_names` (index = label) or remove the field",
        )


# ---------------------------------------------------------------------------------------------- summaries


def constant_images(data: MultimodalDataset) -> list[str]:
    """One warning per modality file whose pixels all hold the same value (the modality then carries nothing:
    often a wrong scale at conversion, e.g. floats in [0, 1] cast to uint8)."""
    warnings = []
    for split_name, split in data.splits.items():
        for k, array in enumerate(split.modalities):
            if array.ndim == 4 and array.size and array.min() == array.max():
                path = data.root / split_name / f"m{k}.npy"
                warnings.append(
                    f"{path}: every pixel of every image is {int(array.min())}: this modality carries no "
                    "information. Fix: check how the file was made (uint8 0..255 expected; floats in [0, 1] "
                    "must be scaled by 255 before the cast)"
                )
    return warnings


def fingerprint(data: MultimodalDataset, rows: int = 64) -> str:
    """A short hash of what a data set is: its modalities, split sizes, image shapes and the pixels of its first
    and last training tuples. Equal for copies of one set, so a moved data set is recognised on resume."""
    import hashlib

    h = hashlib.sha256()
    h.update(json.dumps([data.modality_names, {k: s.n for k, s in data.splits.items()}]).encode())
    train = data.splits["train"]
    for array in train.modalities:
        h.update(str(array.shape).encode())
        h.update(np.ascontiguousarray(array[:rows]).tobytes())
        h.update(np.ascontiguousarray(array[-1:]).tobytes())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------- factors


def factor_columns(labels: np.ndarray) -> np.ndarray:
    """labels.npy as [N, F] (a 1-D file is one factor)."""
    return labels[:, None] if labels.ndim == 1 else labels


def check_factors(splits: dict[str, MultimodalSplit], names: list[str] | None, root: Path) -> list[str] | None:
    """The factor names of a data set: every labelled split has the same number of columns F, and the manifest's
    `factors` (optional: default f0..f{F-1}, or `class` for 1-D labels) lists exactly F names."""
    widths = {s: factor_columns(split.labels).shape[1] for s, split in splits.items() if split.labels is not None}
    if not widths:
        return None if names is None else list(names)
    first = next(iter(widths))
    for split_name, f in widths.items():
        if f != widths[first]:
            raise DataError(
                f"holds {f} factor columns but {first}/labels.npy holds {widths[first]}",
                path=root / split_name / "labels.npy",
                fix="give every split's labels.npy the same factor columns, in the same order",
            )
    f = widths[first]
    if names is None:
        return ["class"] if splits[first].labels.ndim == 1 else [f"f{i}" for i in range(f)]
    if len(names) != f:
        raise DataError(
            f"field `factors` lists {len(names)} names ({', '.join(names)}) but {first}/labels.npy holds {f} factor "
            f"column{'s' if f != 1 else ''}",
            path=root / MANIFEST,
            fix="list one name per column of labels.npy in `factors` (in column order), or remove the field",
        )
    return list(names)


def modality_info(data: MultimodalDataset) -> list[dict[str, Any]]:
    """What each modality holds, for the model to fit its networks and likelihoods to: the kind, the array shape
    after N, the manifest's likelihood settings and, for text, the vocabulary size and special token ids."""
    out = []
    train = data.splits["train"]
    for k, spec in enumerate(data.modality_specs):
        info = {**spec.to_manifest(), "kind": spec.kind, "shape": [int(s) for s in train.modalities[k].shape[1:]]}
        if spec.kind == "text":
            info["vocab_size"] = len(data.vocabs[k])
        out.append(info)
    return out


def read_vocabs(root: str | Path) -> dict[int, list[str]]:
    """Words by token id of each text modality of the data set at ``root`` (by modality index), from its manifest
    and vocabulary files only (no arrays are read)."""
    root = Path(root)
    manifest = read_manifest(root) or {}
    specs = parse_specs(manifest.get(SPECS_FIELD), None, root / MANIFEST) or []
    return {k: read_vocab(root / s.vocab) for k, s in enumerate(specs) if s.kind == "text"}
