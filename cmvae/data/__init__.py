"""Data layer: our multimodal on-disk format, PolyMNIST conversion, the built-in PolyDigits set."""

from cmvae_engine.cmvae.data.errors import DataError
from cmvae_engine.cmvae.data.format import (
    MultimodalDataset,
    MultimodalSplit,
    read_dataset,
    read_manifest,
    write_dataset,
)
from cmvae_engine.cmvae.data.polydigits import PolyDigitsTrace, make_polydigits_splits, synth_polydigits
from cmvae_engine.cmvae.data.polymnist import convert_polymnist, read_polymnist
from cmvae_engine.cmvae.data.resolve import default_data_root, resolve_dataset

__all__ = [
    "DataError",
    "MultimodalDataset",
    "MultimodalSplit",
    "PolyDigitsTrace",
    "convert_polymnist",
    "default_data_root",
    "make_polydigits_splits",
    "read_dataset",
    "read_manifest",
    "read_polymnist",
    "resolve_dataset",
    "synth_polydigits",
    "write_dataset",
]
