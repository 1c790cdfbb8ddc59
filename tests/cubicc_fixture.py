"""A tiny CUBICC folder in the released layout (images.pt, captions.pt one-hot, labels.pt, split .npy files,
cub.vocab), written by the tests; nothing is downloaded."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

WORDS = ["<exc>", "<pad>", "<eos>", "a", "bird", "with", "red", "blue", "wings", "small", "beak", "long"]
LENGTH = 32


def write_cubicc(root: Path, n: int = 40, n_classes: int = 4, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    labels = rng.integers(0, n_classes, n)
    images = torch.from_numpy(rng.random((n, 3, 64, 64), dtype=np.float32))
    ids = np.full((n, LENGTH), WORDS.index("<pad>"))
    for i in range(n):
        words = rng.integers(3, len(WORDS), rng.integers(3, 12))
        ids[i, :len(words)] = words
        ids[i, len(words)] = WORDS.index("<eos>")
    onehot = torch.nn.functional.one_hot(torch.from_numpy(ids), len(WORDS)).float()
    torch.save(images, root / "images.pt")
    torch.save(onehot, root / "captions.pt")
    torch.save(torch.from_numpy(labels), root / "labels.pt")
    order = rng.permutation(n)
    a, b = int(n * 0.6), int(n * 0.8)
    np.save(root / "train_split.npy", order[:a])
    np.save(root / "validation_split.npy", order[a:b])
    np.save(root / "test_split.npy", order[b:])
    (root / "cub.vocab").write_text(json.dumps({"i2w": {str(i): w for i, w in enumerate(WORDS)},
                                                "w2i": {w: i for i, w in enumerate(WORDS)}}))
    return root
