"""Modality kinds of our format: what each modality file holds, declared in the manifest's `modality_specs`.

- ``image``: uint8 N x C x H x W with H = W one of IMAGE_SIZES (the sizes a network family exists for).
- ``text``: integer token ids N x L, with a vocabulary file in the data set folder (a JSON list of words, index =
  id, or an object {"i2w": {"0": word, ...}} as CUBICC's cub.vocab) and the ids of the padding and end tokens.

Each spec may also carry likelihood settings that differ from the model's defaults (`likelihood`,
`likelihood_scale`, `llik_scaling`). A manifest without `modality_specs` (every data set written before kinds
existed) describes image modalities only.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cmvae_engine.cmvae.data.errors import DataError

KINDS = ("image", "text")
IMAGE_SIZES = (28, 32, 64)
"""Square image sizes a network family exists for: the PolyMNIST ResNet (28) and the CUBICC ResNet family (32, 64)."""
LIKELIHOODS = {"image": ("laplace", "normal"), "text": ("categorical",)}
SPECS_FIELD = "modality_specs"
_SPEC_KEYS = {"kind", "vocab", "pad_id", "end_id", "likelihood", "likelihood_scale", "llik_scaling"}


@dataclass
class ModalitySpec:
    """What one modality holds and how it is modelled where that differs from the defaults (None: default)."""

    kind: str = "image"
    vocab: str | None = None
    """text: the vocabulary file, relative to the data set folder."""
    pad_id: int | None = None
    end_id: int | None = None
    likelihood: str | None = None
    likelihood_scale: float | None = None
    llik_scaling: float | None = None

    def to_manifest(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


def image_spec(**likelihood: Any) -> ModalitySpec:
    return ModalitySpec("image", **likelihood)


def text_spec(vocab: str, pad_id: int, end_id: int, **likelihood: Any) -> ModalitySpec:
    return ModalitySpec("text", vocab=vocab, pad_id=pad_id, end_id=end_id, **likelihood)


def parse_specs(raw: Any, n_modalities: int | None, manifest: Path) -> list[ModalitySpec] | None:
    """The validated `modality_specs` of a manifest (None when absent: image modalities only)."""
    if raw is None:
        return None
    example = '[{"kind": "image"}, {"kind": "text", "vocab": "vocab.json", "pad_id": 0, "end_id": 1}]'
    if not isinstance(raw, list) or not all(isinstance(s, dict) for s in raw):
        raise DataError(f"field `{SPECS_FIELD}` must be a list of objects, one per modality", path=manifest,
                        fix=f"write e.g. \"{SPECS_FIELD}\": {example}, or remove the field (image modalities)")
    if n_modalities is not None and len(raw) != n_modalities:
        raise DataError(f"field `{SPECS_FIELD}` lists {len(raw)} modalities, the data set has {n_modalities}",
                        path=manifest, fix="give one spec per modality file, in the order m0, m1, ...")
    return [_parse_one(s, k, manifest) for k, s in enumerate(raw)]


def _parse_one(raw: dict, k: int, manifest: Path) -> ModalitySpec:
    where = f"field `{SPECS_FIELD}[{k}]`"
    unknown = sorted(set(raw) - _SPEC_KEYS)
    if unknown:
        raise DataError(f"{where} has unknown keys {unknown}", path=manifest,
                        fix=f"use only {', '.join(sorted(_SPEC_KEYS))}")
    kind = raw.get("kind", "image")
    if kind not in KINDS:
        raise DataError(f"{where}: kind {kind!r} is not one of {', '.join(KINDS)}", path=manifest,
                        fix='write "kind": "image" (uint8 N x C x H x W) or "kind": "text" (token ids N x L)')
    spec = ModalitySpec(kind=kind, **{key: raw[key] for key in _SPEC_KEYS - {"kind"} if key in raw})
    if kind == "text":
        if not isinstance(spec.vocab, str) or not spec.vocab:
            raise DataError(f"{where}: a text modality needs a vocabulary file (`vocab`)", path=manifest,
                            fix='add "vocab": "vocab.json" (a JSON list of words in the data set folder), '
                                "or declare the modality as an image")
        for key in ("pad_id", "end_id"):
            value = getattr(spec, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise DataError(f"{where}: `{key}` must be a non-negative token id, got {value!r}", path=manifest,
                                fix=f'add e.g. "{key}": 0 (the id of the {key[:-3]} token in the vocabulary)')
    elif spec.vocab is not None or spec.pad_id is not None or spec.end_id is not None:
        raise DataError(f"{where}: `vocab`, `pad_id` and `end_id` belong to text modalities", path=manifest,
                        fix='remove them, or declare the modality "kind": "text"')
    if spec.likelihood is not None and spec.likelihood not in LIKELIHOODS[kind]:
        raise DataError(f"{where}: likelihood {spec.likelihood!r} does not suit a {kind} modality", path=manifest,
                        fix=f"use one of {', '.join(LIKELIHOODS[kind])} or remove the field")
    for key in ("likelihood_scale", "llik_scaling"):
        value = getattr(spec, key)
        if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0):
            raise DataError(f"{where}: `{key}` must be a positive number, got {value!r}", path=manifest,
                            fix="write a positive number or remove the field (the model's default applies)")
        if value is not None:
            setattr(spec, key, float(value))
    if kind == "text" and spec.likelihood_scale is not None:
        raise DataError(f"{where}: a categorical caption likelihood has no scale", path=manifest,
                        fix="remove `likelihood_scale` (keep `llik_scaling` to weight the captions)")
    return spec


def read_vocab(path: Path) -> list[str]:
    """Words by id from a vocabulary file: a JSON list of strings, or {"i2w": {"0": w0, "1": w1, ...}} (the
    ids must then be 0..V-1, each once)."""
    fix = ('write a JSON list of words (index = token id), e.g. ["<pad>", "<eos>", "a", "bird"], or an object '
           '{"i2w": {"0": "<pad>", ...}} as CUBICC\'s cub.vocab')
    if not path.is_file():
        raise DataError("vocabulary file not found", path=path, fix=f"put the vocabulary there; {fix}")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"vocabulary does not parse as JSON ({err})", path=path, fix=fix) from err
    if isinstance(raw, dict) and isinstance(raw.get("i2w"), dict):
        i2w = raw["i2w"]
        try:
            ids = sorted(int(k) for k in i2w)
        except ValueError:
            raise DataError("vocabulary `i2w` keys must be integer ids", path=path, fix=fix) from None
        if ids != list(range(len(ids))):
            raise DataError(f"vocabulary `i2w` ids are not 0..{len(ids) - 1} each once", path=path, fix=fix)
        words = [i2w[str(i)] for i in ids]
    elif isinstance(raw, list):
        words = raw
    else:
        raise DataError(f"vocabulary holds a JSON {type(raw).__name__}, not a list of words", path=path, fix=fix)
    if not words or not all(isinstance(w, str) for w in words):
        raise DataError("vocabulary must be a non-empty list of strings", path=path, fix=fix)
    return words


def check_text(array: np.ndarray, path: Path, vocab_size: int, vocab_path: Path) -> None:
    """Token ids: integer, 2-D N x L, every id inside the vocabulary."""
    if array.ndim != 2 or not np.issubdtype(array.dtype, np.integer):
        raise DataError(
            f"captions have shape {tuple(array.shape)} and dtype {array.dtype}; a text modality holds integer "
            "token ids N x L", path=path,
            fix="store ids as np.int64 (or int32/int16) N x L, padded with the pad id; one-hot captions: "
                "x.argmax(-1)")
    if array.size and (array.min() < 0 or array.max() >= vocab_size):
        bad = int(array.min()) if array.min() < 0 else int(array.max())
        raise DataError(f"token id {bad} is outside the vocabulary ({vocab_size} words in {vocab_path})",
                        path=path, fix="use ids 0..V-1 of that vocabulary, or give the vocabulary the missing words")
