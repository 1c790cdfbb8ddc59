"""Coherence classifiers for modalities other than 28x28 images: images of any supported size and captions.

- 28x28 images keep the reference's DigitClassifier (classifier.py; the PolyMNIST weights load into it).
- other image sizes: the same layers with an adaptive average pool to 7x7 before the first linear layer.
- captions: a bag of words (mean of learned word embeddings, padding left out) and a two-layer MLP.

Each model keeps its layers in `encoder`, the last one the Linear to the classes, as DigitClassifier does (the
unconditional coherence reads the class count there). `architecture` describes a model in classifiers.json so the
folder can be loaded back.
"""

from __future__ import annotations

import torch
from torch import nn

from cmvae_engine.cmvae.evaluation.classifier import DigitClassifier


class SizedImageClassifier(nn.Module):
    def __init__(self, in_channels: int = 3, n_classes: int = 10):
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv2d(in_channels, 10, kernel_size=4, stride=2, padding=1), nn.Dropout2d(0.5), nn.ReLU(),
            nn.Conv2d(10, 20, kernel_size=4, stride=2, padding=1), nn.Dropout2d(0.5), nn.ReLU(),
            nn.AdaptiveAvgPool2d(7), nn.Flatten(), nn.Linear(980, 128), nn.Dropout(0.5), nn.ReLU(),
            nn.Linear(128, n_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)


class _MeanOfWords(nn.Module):
    def __init__(self, vocab_size: int, dim: int, pad_id: int):
        super().__init__()
        self.bag = nn.EmbeddingBag(vocab_size, dim, mode="mean", padding_idx=pad_id)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.bag(tokens.long())


class CaptionClassifier(nn.Module):
    def __init__(self, vocab_size: int, n_classes: int = 10, pad_id: int = 0, dim: int = 64):
        super().__init__()
        self.encoder = nn.Sequential(_MeanOfWords(vocab_size, dim, pad_id), nn.Linear(dim, 128), nn.ReLU(),
                                     nn.Linear(128, n_classes))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.encoder(tokens)


def architecture_of(info: dict) -> dict:
    """The classifier description of a modality (from format.modality_info)."""
    if info["kind"] == "text":
        return {"kind": "text", "vocab_size": info["vocab_size"], "pad_id": info["pad_id"]}
    c, h, _ = info["shape"]
    return {"kind": "image", "channels": c, "size": h}


def build_classifier(arch: dict, n_classes: int) -> nn.Module:
    if arch["kind"] == "text":
        return CaptionClassifier(arch["vocab_size"], n_classes, arch["pad_id"])
    if arch["size"] == 28:
        return DigitClassifier(arch["channels"], n_classes)
    return SizedImageClassifier(arch["channels"], n_classes)
