"""Modality kinds in the format (image sizes, captions with a vocabulary), their bad inputs, and the CUBICC loader
on a fixture in the released layout."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from cubicc_fixture import LENGTH, WORDS, write_cubicc

from cmvae_engine.cmvae.data import DataError, MultimodalSplit, read_dataset, write_dataset
from cmvae_engine.cmvae.data.cubicc import convert_cubicc
from cmvae_engine.cmvae.data.kinds import image_spec, text_spec
from cmvae_engine.cmvae.data.polydigits_captions import DIGIT_WORDS, make_captions, vocabulary

VOCAB = ["<pad>", "<eos>", "a", "red", "bird"]


def _write(root: Path, size: int = 64) -> Path:
    rng = np.random.default_rng(0)

    def split(n: int) -> MultimodalSplit:
        images = rng.integers(0, 256, (n, 3, size, size), dtype=np.uint8)
        captions = rng.integers(0, len(VOCAB), (n, 8)).astype(np.int64)
        return MultimodalSplit([images, captions], rng.integers(0, 3, n))

    return write_dataset(root, {"train": split(6), "test": split(4)}, name="toy",
                         specs=[image_spec(likelihood_scale=0.01), text_spec("words.json", pad_id=0, end_id=1)],
                         vocabs={1: VOCAB})


def test_image_and_text_round_trip(tmp_path):
    root = _write(tmp_path / "ds")
    data = read_dataset(root)
    assert [s.kind for s in data.modality_specs] == ["image", "text"]
    assert data.modality_specs[0].likelihood_scale == 0.01
    assert data.vocabs == {1: VOCAB}
    assert data.split("train").modalities[1].shape == (6, 8)
    assert json.loads((root / "words.json").read_text()) == VOCAB


def test_old_manifest_without_kinds_is_images(tmp_path):
    rng = np.random.default_rng(0)
    splits = {s: MultimodalSplit([rng.integers(0, 256, (3, 3, 32, 32), dtype=np.uint8)] * 2) for s in ("train", "test")}
    data = read_dataset(write_dataset(tmp_path / "ds", splits, name="x"))
    assert data.specs is None and [s.kind for s in data.modality_specs] == ["image", "image"]


def _manifest_edit(root: Path, fn) -> None:
    path = root / "manifest.json"
    manifest = json.loads(path.read_text())
    fn(manifest)
    path.write_text(json.dumps(manifest))


BAD = {
    "caption id outside the vocabulary": (
        lambda r: np.save(r / "train/m1.npy", np.full((6, 8), len(VOCAB), np.int64)), "train/m1.npy",
        ["token id 5 is outside the vocabulary", "words.json"]),
    "vocabulary does not parse": (lambda r: (r / "words.json").write_text("[\"a\", "), "words.json",
                                  ["does not parse", "JSON list of words"]),
    "text modality without a vocabulary": (
        lambda r: _manifest_edit(r, lambda m: m["modality_specs"][1].pop("vocab")), "manifest.json",
        ["needs a vocabulary file", '"vocab": "vocab.json"']),
    "vocabulary file missing": (lambda r: (r / "words.json").unlink(), "words.json", ["not found"]),
    "image size no network supports": (
        lambda r: np.save(r / "train/m0.npy", np.zeros((6, 3, 48, 48), np.uint8)), "train/m0.npy",
        ["48x48", "resize the images to one of 28x28, 32x32, 64x64"]),
    "unknown kind": (lambda r: _manifest_edit(r, lambda m: m["modality_specs"][0].update(kind="audio")),
                     "manifest.json", ["'audio'", '"kind": "text"']),
    "pad id outside the vocabulary": (
        lambda r: _manifest_edit(r, lambda m: m["modality_specs"][1].update(pad_id=9)), "manifest.json",
        ["`pad_id` 9 is outside the vocabulary"]),
    "float captions": (lambda r: np.save(r / "test/m1.npy", np.zeros((4, 8), np.float32)), "test/m1.npy",
                       ["integer token ids", "argmax"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_modalities_name_file_and_fix(tmp_path, case):
    mutate, file_named, needles = BAD[case]
    root = _write(tmp_path / "ds")
    mutate(root)
    with pytest.raises(DataError) as info:
        read_dataset(root)
    message = str(info.value)
    assert file_named in message and "Fix:" in message
    for needle in needles:
        assert needle in message, message


def test_writer_refuses_ids_outside_vocabulary(tmp_path):
    splits = {s: MultimodalSplit([np.zeros((2, 3, 28, 28), np.uint8), np.full((2, 8), 7, np.int64)])
              for s in ("train", "test")}
    with pytest.raises(DataError, match="outside the vocabulary"):
        write_dataset(tmp_path / "ds", splits, name="x", specs=[image_spec(), text_spec("v.json", 0, 1)],
                      vocabs={1: VOCAB})


def test_captions_name_their_digit():
    labels = np.arange(10).repeat(5)
    captions = make_captions(labels, np.random.default_rng(0))
    words = vocabulary()
    for label, row in zip(labels, captions, strict=True):
        text = [words[t] for t in row]
        assert DIGIT_WORDS[label] in text
        assert sum(w in DIGIT_WORDS for w in text) == 1  # no other digit word
        assert text[text.index("<eos>") + 1:] == ["<pad>"] * (len(text) - text.index("<eos>") - 1)


# ----- CUBICC -------------------------------------------------------------------------------------------------
def test_cubicc_converts_released_layout(tmp_path):
    src = write_cubicc(tmp_path / "CUBICC")
    data = read_dataset(convert_cubicc(src, tmp_path / "cubicc"))
    images = torch.load(src / "images.pt", weights_only=True)
    onehot = torch.load(src / "captions.pt", weights_only=True)
    labels = torch.load(src / "labels.pt", weights_only=True)
    test_idx = np.load(src / "test_split.npy")
    test = data.split("test")
    assert test.modalities[0].dtype == np.uint8 and test.modalities[0].shape[1:] == (3, 64, 64)
    np.testing.assert_array_equal(test.modalities[0], np.round(images[test_idx].numpy() * 255).astype(np.uint8))
    np.testing.assert_array_equal(test.modalities[1], onehot[test_idx].argmax(-1).numpy())
    np.testing.assert_array_equal(test.labels, labels[test_idx].numpy())
    assert data.split("valid").n == len(np.load(src / "validation_split.npy"))
    img, txt = data.modality_specs
    assert (img.likelihood, img.likelihood_scale) == ("laplace", 0.01)
    assert img.llik_scaling == pytest.approx(LENGTH / (3 * 64 * 64))  # the reference's maxSentLen / prod(dataSize)
    assert (txt.kind, txt.llik_scaling, txt.pad_id, txt.end_id) == ("text", 5.0, 1, 2)
    assert data.vocabs[1] == WORDS


def _redo(src: Path, name: str, value) -> None:
    torch.save(value, src / name)


CUBICC_BAD = {
    "missing images": (lambda s: (s / "images.pt").unlink(), "images.pt", "missing"),
    "not one-hot": (lambda s: _redo(s, "captions.pt", torch.full((40, LENGTH, len(WORDS)), 0.5)), "captions.pt",
                    "not one-hot"),
    "ids outside vocabulary": (lambda s: _redo(s, "captions.pt", torch.full((40, LENGTH), 99)), "captions.pt",
                               "outside the vocabulary"),
    "wrong image size": (lambda s: _redo(s, "images.pt", torch.zeros(40, 3, 32, 32)), "images.pt", "N x 3 x 64 x 64"),
    "bad vocabulary": (lambda s: (s / "cub.vocab").write_text("{"), "cub.vocab", "does not parse"),
    "split out of range": (lambda s: np.save(s / "test_split.npy", np.array([0, 400])), "test_split.npy",
                           "40 samples"),
    "labels count": (lambda s: _redo(s, "labels.pt", torch.zeros(39, dtype=torch.long)), "labels.pt", "39 samples"),
}


@pytest.mark.parametrize("case", list(CUBICC_BAD))
def test_cubicc_bad_files_are_named(tmp_path, case):
    mutate, file_named, needle = CUBICC_BAD[case]
    src = write_cubicc(tmp_path / "CUBICC")
    mutate(src)
    with pytest.raises(DataError) as info:
        convert_cubicc(src, tmp_path / "out")
    assert file_named in str(info.value) and needle in str(info.value) and "Fix:" in str(info.value)
    assert not (tmp_path / "out").exists()


def test_cubicc_shaped_data_for_the_bench(tmp_path, monkeypatch):
    from cmvae_engine.engine.cli.bench_train import CUBICC_FLAGS, _shaped

    monkeypatch.setenv("CMVAE_DATA_DIR", str(tmp_path))
    folder, args = _shaped("cubicc", ["--width", "0.0625"])
    data = read_dataset(folder, mmap=True)
    assert data.split("train").image_shapes == [(3, 64, 64), (32,)] and len(data.vocabs[1]) == 1590
    assert data.extra["synthetic"].startswith("random content")
    assert args == [*CUBICC_FLAGS, "--width", "0.0625"]  # given flags come last and override
    with pytest.raises(ValueError, match="cubicc"):
        _shaped("svhn", [])


def _info(tmp_path, shapes, kinds=None):
    info = [{"kind": "image", "shape": list(s)} for s in shapes]
    for k, extra in (kinds or {}).items():
        info[k].update(extra)
    return {"root": str(tmp_path), "modalities": [f"m{k}" for k in range(len(shapes))],
            "image_shapes": [list(s) for s in shapes], "modality_info": info}


def test_which_data_gets_per_modality_networks(tmp_path):
    from cmvae_engine.cmvae.config import ModelConfig
    from cmvae_engine.engine.tasks.modality_fit import fit_modalities

    model = ModelConfig()
    assert fit_modalities(model, _info(tmp_path, [(3, 28, 28), (3, 28, 28)])) is None  # the original CMVAE
    specs = fit_modalities(model, _info(tmp_path, [(3, 32, 32), (1, 64, 64)]))
    assert [(s["size"], s["channels"], s["likelihood_scale"]) for s in specs] == [(32, 3, 0.75), (64, 1, 0.75)]
    text = {"kind": "text", "shape": [12], "vocab_size": 9, "pad_id": 0, "end_id": 1}
    with pytest.raises(DataError, match="multiples of 8") as info:
        fit_modalities(model, _info(tmp_path, [(3, 28, 28), (12,)], {1: text}))
    assert "m1.npy" in str(info.value)
    with pytest.raises(DataError, match="4 channels"):
        fit_modalities(model, _info(tmp_path, [(4, 32, 32), (3, 32, 32)]))
