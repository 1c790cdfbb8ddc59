"""Which networks and likelihoods a data set's modalities get: the heterogeneous side of CMVAE's check_fits.

A data set of M alike 28x28 images without modality specs keeps the original CMVAE (check_fits in cmvae_task.py).
Anything else (images of 32 or 64 pixels, captions, modalities of different sizes, or per-modality likelihood
settings in the manifest) gets one spec per modality for cmvae/hetero.py, or a refusal naming the file and the fix.
"""

from __future__ import annotations

from pathlib import Path

from cmvae_engine.cmvae.config import IMAGE_CHANNELS, ModelConfig
from cmvae_engine.cmvae.data.errors import DataError
from cmvae_engine.cmvae.data.kinds import IMAGE_SIZES
from cmvae_engine.cmvae.networks_cub import EMBEDDING

_OVERRIDES = ("likelihood", "likelihood_scale", "llik_scaling")


def data_is_heterogeneous(data_info: dict) -> bool:
    info = data_info.get("modality_info")
    if not info:
        return False
    return any(m["kind"] != "image" or m["shape"][1:] != [28, 28] or any(k in m for k in _OVERRIDES)
               for m in info)


def fit_modalities(model: ModelConfig, data_info: dict) -> list[dict] | None:
    """The model's per-modality specs for heterogeneous data (None: the original CMVAE fits it)."""
    if not data_is_heterogeneous(data_info):
        return None
    root = Path(data_info["root"])
    specs = []
    for k, m in enumerate(data_info["modality_info"]):
        path = root / "train" / f"m{k}.npy"
        if m["kind"] == "text":
            length = m["shape"][0]
            if length < 8 or length % 8:
                raise DataError(f"captions have length {length}; the caption networks take lengths that are "
                                f"multiples of 8 (the reference: 32, embedding {EMBEDDING})", path=path,
                                fix="pad the token ids with the pad id to the next multiple of 8, e.g. 32")
            specs.append({"kind": "text", "length": length, "vocab_size": m["vocab_size"], "pad_id": m["pad_id"],
                          "end_id": m["end_id"], "llik_scaling": m.get("llik_scaling", 5.0)})
            continue
        c, h, w = m["shape"]
        if c not in IMAGE_CHANNELS:
            raise DataError(f"images have {c} channels; the networks take 1 (grey) or 3 (RGB)", path=path,
                            fix="drop an alpha channel with x[:, :3], or convert the images to grey or RGB")
        if h != w or h not in IMAGE_SIZES:
            raise DataError(f"images are {h}x{w}; the networks take {', '.join(f'{s}x{s}' for s in IMAGE_SIZES)}",
                            path=path, fix="resize the images to one of those sizes")
        specs.append({"kind": "image", "channels": c, "size": h,
                      "likelihood": m.get("likelihood", model.likelihood),
                      "likelihood_scale": m.get("likelihood_scale", model.likelihood_scale),
                      "llik_scaling": m.get("llik_scaling", model.llik_scaling)})
    return specs
