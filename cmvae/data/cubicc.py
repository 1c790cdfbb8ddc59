"""CUBICC (birds: 64x64 images and captions, 8 species) from the authors' released files, converted once to our format.

Released layout (one folder, as the reference's CUBICCDataset reads it)::

    images.pt                 float [N, 3, 64, 64] in [0, 1] (uint8 0..255 is accepted too)
    captions.pt               one-hot float [N, 32, V] (token ids [N, 32] are accepted too)
    labels.pt                 integer [N], the species 0..7
    train_split.npy, validation_split.npy, test_split.npy   integer indices into the N samples
    cub.vocab                 JSON {"i2w": {"0": word, ...}, ...}; V = 1590 in the release
    (train_test_labelling.pt, original_labels.pt: read by the reference but never used; ignored here)

Every .pt file is read with torch.load(weights_only=True). The converted set has m0 (images, uint8) and m1 (caption
token ids, int64) with the reference's likelihoods in the manifest: images Laplace with scale 0.01 and llik scaling
32 / (3 * 64 * 64) (caption length over image size), captions categorical with llik scaling 5.0. The splits map to
train / valid / test.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cmvae_engine.cmvae.data.errors import DataError
from cmvae_engine.cmvae.data.format import MultimodalSplit, write_dataset
from cmvae_engine.cmvae.data.kinds import image_spec, read_vocab, text_spec

FILES = ("images.pt", "captions.pt", "labels.pt", "cub.vocab")
SPLIT_FILES = {"train": "train_split.npy", "valid": "validation_split.npy", "test": "test_split.npy"}
IMAGE_SIZE = 64
IMAGE_LAPLACE_SCALE = 0.01
CAPTION_LLIK_SCALING = 5.0
PAD, EOS = "<pad>", "<eos>"
VOCAB_FILE = "vocab.json"
_REDO = "re-extract the released CUBICC folder (nothing is downloaded: copy it from where you obtained it)"


def _load_pt(path: Path):
    import torch

    if not path.is_file():
        raise DataError("missing from the CUBICC folder", path=path,
                        fix=f"the folder must hold {', '.join(FILES)} and the three *_split.npy files; {_REDO}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises several types for a bad file
        raise DataError(f"cannot be read as a torch tensor file ({type(err).__name__}: {str(err)[:200]})",
                        path=path, fix=_REDO) from None


def _as_numpy(value, path: Path) -> np.ndarray:
    import torch

    if not isinstance(value, torch.Tensor):
        raise DataError(f"holds a {type(value).__name__}, expected one tensor", path=path, fix=_REDO)
    return value.numpy()


def read_images(path: Path) -> np.ndarray:
    """uint8 [N, 3, 64, 64]."""
    x = _as_numpy(_load_pt(path), path)
    if x.ndim != 4 or x.shape[1:] != (3, IMAGE_SIZE, IMAGE_SIZE):
        raise DataError(f"images have shape {x.shape}, expected N x 3 x 64 x 64", path=path, fix=_REDO)
    if x.dtype == np.uint8:
        return np.ascontiguousarray(x)
    if not np.issubdtype(x.dtype, np.floating):
        raise DataError(f"images have dtype {x.dtype}, expected floats in [0, 1] or uint8", path=path, fix=_REDO)
    lo, hi = float(x.min()), float(x.max())
    if lo < -1e-6 or hi > 1 + 1e-6:
        raise DataError(f"image values span [{lo:.3g}, {hi:.3g}], expected [0, 1]", path=path, fix=_REDO)
    return np.round(np.clip(x, 0, 1) * 255.0).astype(np.uint8)


def read_captions(path: Path, vocab_size: int, vocab_path: Path) -> np.ndarray:
    """int64 token ids [N, L] from one-hot [N, L, V] (or ids [N, L])."""
    x = _as_numpy(_load_pt(path), path)
    if x.ndim == 3:
        if x.shape[2] != vocab_size:
            raise DataError(f"one-hot captions have {x.shape[2]} classes but {vocab_path} holds {vocab_size} words",
                            path=path, fix="use the vocabulary the captions were made with (cub.vocab of the release)")
        sums = x.sum(-1)
        if not np.allclose(sums, 1.0) or not np.allclose(x.max(-1), 1.0):
            raise DataError("captions are not one-hot (every position needs exactly one 1)", path=path, fix=_REDO)
        return x.argmax(-1).astype(np.int64)
    if x.ndim == 2 and np.issubdtype(x.dtype, np.integer):
        if x.size and (x.min() < 0 or x.max() >= vocab_size):
            bad = int(x.min()) if x.min() < 0 else int(x.max())
            raise DataError(f"token id {bad} is outside the vocabulary ({vocab_size} words in {vocab_path})",
                            path=path, fix="use the vocabulary the captions were made with (cub.vocab of the release)")
        return x.astype(np.int64)
    raise DataError(f"captions have shape {x.shape} and dtype {x.dtype}; expected one-hot N x L x V (or ids N x L)",
                    path=path, fix=_REDO)


def _read_split_index(path: Path, n: int) -> np.ndarray:
    if not path.is_file():
        raise DataError("split file missing", path=path, fix=f"the folder needs {', '.join(SPLIT_FILES.values())}")
    try:
        idx = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise DataError(f"cannot be read as a .npy array ({err})", path=path, fix=_REDO) from err
    if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer):
        raise DataError(f"holds {idx.dtype} {idx.shape}, expected 1-D integer indices", path=path, fix=_REDO)
    if idx.size and (idx.min() < 0 or idx.max() >= n):
        raise DataError(f"indices span {idx.min()}..{idx.max()} but the data has {n} samples", path=path, fix=_REDO)
    return idx.astype(np.int64)


def read_cubicc(src: str | Path) -> tuple[dict[str, MultimodalSplit], list[str], int, int]:
    """(splits, words by id, pad id, end id) of a released CUBICC folder, validated."""
    src = Path(src)
    if not src.is_dir():
        raise DataError("CUBICC folder not found", path=src, fix=f"pass the folder holding {', '.join(FILES)}")
    vocab_path = src / "cub.vocab"
    words = read_vocab(vocab_path)
    for token in (PAD, EOS):
        if token not in words:
            raise DataError(f"vocabulary has no {token} token", path=vocab_path,
                            fix=f"use the release's cub.vocab (it holds {PAD} and {EOS})")
    images = read_images(src / "images.pt")
    captions = read_captions(src / "captions.pt", len(words), vocab_path)
    labels = _as_numpy(_load_pt(src / "labels.pt"), src / "labels.pt")
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer) or (labels.size and labels.min() < 0):
        raise DataError(f"labels have shape {labels.shape} and dtype {labels.dtype}, expected class ids [N] >= 0",
                        path=src / "labels.pt", fix=_REDO)
    n = images.shape[0]
    for name, arr in (("captions.pt", captions), ("labels.pt", labels)):
        if arr.shape[0] != n:
            raise DataError(f"holds {arr.shape[0]} samples but images.pt holds {n}", path=src / name, fix=_REDO)
    splits = {}
    for split, file in SPLIT_FILES.items():
        idx = _read_split_index(src / file, n)
        splits[split] = MultimodalSplit([images[idx], captions[idx]], labels[idx].astype(np.int64))
    return splits, words, words.index(PAD), words.index(EOS)


def convert_cubicc(src: str | Path, dst: str | Path) -> Path:
    """Read, validate and write CUBICC in our format (m0 images, m1 captions + vocab.json)."""
    splits, words, pad_id, end_id = read_cubicc(src)
    length = splits["train"].modalities[1].shape[1]
    image_scaling = length / (3 * IMAGE_SIZE * IMAGE_SIZE)
    n_classes = int(max(int(s.labels.max()) for s in splits.values() if s.labels.size)) + 1
    return write_dataset(
        dst, splits, name="cubicc", modality_names=["image", "caption"],
        label_names=[f"species {c}" for c in range(n_classes)],
        specs=[image_spec(likelihood="laplace", likelihood_scale=IMAGE_LAPLACE_SCALE, llik_scaling=image_scaling),
               text_spec(VOCAB_FILE, pad_id=pad_id, end_id=end_id, llik_scaling=CAPTION_LLIK_SCALING)],
        vocabs={1: words},
        extra={"converted_from": {"kind": "cubicc", "source": str(Path(src).absolute())}},
    )


def synth_cubicc_shaped(dst: str | Path, *, n_train: int = 1024, n_test: int = 256, vocab_size: int = 1590,
                        length: int = 32, n_classes: int = 8, seed: int = 0) -> Path:
    """Random data in CUBICC's shapes and with its likelihood settings (64x64 RGB images, captions of `length` ids
    over `vocab_size` words), for timing the CUBICC-shaped training step where the real data is absent. Its content
    is noise: never a stand-in for CUBICC's results."""
    rng = np.random.default_rng(seed)
    words = [PAD, EOS, *(f"w{i}" for i in range(vocab_size - 2))]

    def split(n: int) -> MultimodalSplit:
        images = rng.integers(0, 256, (n, 3, IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
        captions = rng.integers(2, vocab_size, (n, length)).astype(np.int64)
        return MultimodalSplit([images, captions], rng.integers(0, n_classes, n).astype(np.int64))

    return write_dataset(
        dst, {"train": split(n_train), "test": split(n_test)}, name="cubicc-shaped",
        modality_names=["image", "caption"],
        specs=[image_spec(likelihood="laplace", likelihood_scale=IMAGE_LAPLACE_SCALE,
                          llik_scaling=length / (3 * IMAGE_SIZE * IMAGE_SIZE)),
               text_spec(VOCAB_FILE, pad_id=0, end_id=1, llik_scaling=CAPTION_LLIK_SCALING)],
        vocabs={1: words},
        extra={"synthetic": "random content in CUBICC's shapes, for timing only",
               "generator": {"kind": "cubicc-shaped", "n_train": n_train, "n_test": n_test,
                             "vocab_size": vocab_size, "length": length, "seed": seed}},
    )
