"""PolyDigits with captions: a built-in, offline image + text data set.

Two PolyDigits image modalities (28x28, polydigits.py) and a caption modality that names the tuple's digit in words
("a neat handwritten seven", "this picture shows the number seven", ...): one of several templates and filler words
drawn at random per tuple, so the only thing every caption of a class shares is the digit's word. Token ids are
padded to CAPTION_LENGTH with <pad> (id 0) after an <eos> (id 1).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cmvae_engine.cmvae.data.format import MultimodalSplit, write_dataset
from cmvae_engine.cmvae.data.kinds import image_spec, text_spec
from cmvae_engine.cmvae.data.polydigits import FAMILIES, N_CLASSES, make_polydigits_splits
from cmvae_engine.cmvae.progress import ProgressFn

GENERATOR_VERSION = 1
NAME = "polydigits-captions"
N_IMAGE_MODALITIES = 2
CAPTION_LENGTH = 16
PAD, EOS = "<pad>", "<eos>"
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
ADJECTIVES = ("neat", "messy", "small", "large", "thin", "bold", "slanted", "clear")
TEMPLATES = (
    "a {adj} handwritten {digit}",
    "this picture shows the number {digit}",
    "the digit {digit} written by hand",
    "a {digit} on a textured background",
    "here is a {adj} {digit}",
    "someone wrote the numeral {digit} in a {adj} hand",
    "{digit}",
    "it is a {digit} drawn in {adj} strokes",
)
VOCAB_FILE = "vocab.json"


def vocabulary() -> list[str]:
    words = {w for t in TEMPLATES for w in t.replace("{adj}", "").replace("{digit}", "").split()}
    return [PAD, EOS, *DIGIT_WORDS, *ADJECTIVES, *sorted(words)]


def make_captions(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """int64 [N, CAPTION_LENGTH]: a random template per tuple naming labels[i] in words, then <eos>, <pad>..."""
    ids = {w: i for i, w in enumerate(vocabulary())}
    out = np.full((labels.size, CAPTION_LENGTH), ids[PAD], dtype=np.int64)
    templates = rng.integers(0, len(TEMPLATES), size=labels.size)
    adjectives = rng.integers(0, len(ADJECTIVES), size=labels.size)
    for i, (label, t, a) in enumerate(zip(labels, templates, adjectives, strict=True)):
        words = TEMPLATES[t].format(adj=ADJECTIVES[a], digit=DIGIT_WORDS[label]).split() + [EOS]
        out[i, :len(words)] = [ids[w] for w in words]
    return out


def generator_params(*, n_train: int = 10000, n_valid: int = 1000, n_test: int = 2000, seed: int = 0) -> dict:
    return {"kind": NAME, "version": GENERATOR_VERSION, "n_train": n_train, "n_valid": n_valid, "n_test": n_test,
            "seed": seed}


def synth_polydigits_captions(dst: str | Path, *, n_train: int = 10000, n_valid: int = 1000, n_test: int = 2000,
                              seed: int = 0, progress: ProgressFn | None = None) -> Path:
    """Generate the set and write it to ``dst`` in our format (images m0, m1; captions m2 with vocab.json)."""
    images = make_polydigits_splits(n_modalities=N_IMAGE_MODALITIES, n_train=n_train, n_valid=n_valid,
                                    n_test=n_test, seed=seed, progress=progress)
    caption_seq = np.random.SeedSequence([seed, 7]).spawn(3)
    splits = {}
    for (name, split), seq in zip(images.items(), caption_seq, strict=False):
        captions = make_captions(split.labels, np.random.default_rng(seq))
        splits[name] = MultimodalSplit([*split.modalities, captions], split.labels)
    words = vocabulary()
    return write_dataset(
        dst, splits, name=NAME,
        modality_names=[*(f"m{k}-{f.name}" for k, f in enumerate(FAMILIES[:N_IMAGE_MODALITIES])), "caption"],
        label_names=list(DIGIT_WORDS[:N_CLASSES]),
        specs=[image_spec(), image_spec(), text_spec(VOCAB_FILE, pad_id=words.index(PAD), end_id=words.index(EOS))],
        vocabs={N_IMAGE_MODALITIES: words},
        extra={"generator": generator_params(n_train=n_train, n_valid=n_valid, n_test=n_test, seed=seed)},
    )
