"""Turn a data set name or path (as given on the command line or in a config) into a folder in our format."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

from cmvae_engine.cmvae.data import polydigits_captions as captions
from cmvae_engine.cmvae.data.errors import DataError
from cmvae_engine.cmvae.data.format import CREATE_HINT, MANIFEST, read_manifest
from cmvae_engine.cmvae.data.polydigits import generator_params, synth_polydigits
from cmvae_engine.cmvae.data.polymnist import convert_polymnist
from cmvae_engine.cmvae.progress import ProgressFn

log = logging.getLogger(__name__)

DATA_DIR_ENV = "CMVAE_DATA_DIR"
DEFAULT_MODALITIES = 5
KNOWN_NAMES = ("polydigits", "polymnist", "facetdigits", "polydigits-captions")
_FORMAT = (
    "a folder with train/ and test/ (optional valid/) holding m0.npy, m1.npy, ... (uint8 N x C x 28 x 28), "
    "optional labels.npy, plus an optional manifest.json"
)


def default_data_root() -> Path:
    """``$CMVAE_DATA_DIR`` if set, else ``./data``."""
    return Path(os.environ.get(DATA_DIR_ENV) or "data").expanduser().absolute()


def resolve_dataset(
    name_or_path: str, *, data_root: str | Path | None = None, n_modalities: int | None = None, seed: int = 0,
    progress: ProgressFn | None = None,
) -> Path:
    """The folder holding the named data set, creating it first where that can be done offline.

    ``polydigits`` is synthesised on first use (and again when its cached parameters differ);
    ``polymnist`` is converted once from the raw ``{root}/PolyMNIST``; anything else is a folder path.
    Call it from one process only (e.g. rank 0) when it may write. ``progress`` is called only while a data set
    is being made (synthesis or conversion), with (units done, total).
    """
    root = Path(data_root).expanduser() if data_root is not None else default_data_root()
    if name_or_path == "polydigits":
        return _polydigits(root, n_modalities, seed, progress)
    if name_or_path == "polymnist":
        return _polymnist(root, seed, progress)
    if name_or_path == "facetdigits":
        return _facetdigits(root, seed, progress)
    if name_or_path == captions.NAME:
        return _polydigits_captions(root, seed, progress)
    path = Path(name_or_path).expanduser()
    if not path.is_dir():
        raise DataError(
            f"not a known data set name ({', '.join(KNOWN_NAMES)}) and no such folder",
            path=path,
            fix=f"pass a known name or the path of {_FORMAT}; to {CREATE_HINT}",
        )
    return path


def _polydigits(root: Path, n_modalities: int | None, seed: int, progress: ProgressFn | None) -> Path:
    m = DEFAULT_MODALITIES if n_modalities is None else n_modalities
    folder = root / ("polydigits" if m == DEFAULT_MODALITIES else f"polydigits-m{m}")
    return _cached(folder, generator_params(n_modalities=m, seed=seed), f"polydigits (M={m}, seed={seed})",
                   lambda: synth_polydigits(folder, n_modalities=m, seed=seed, progress=progress))


def _cached(folder: Path, wanted: dict, what: str, synth: Callable[[], Path]) -> Path:
    """A synthesised data set's folder: reused when its manifest records the generator parameters `wanted`, else
    (absent, stale or unreadable) synthesised afresh by `synth`."""
    try:
        found = (read_manifest(folder) or {}).get("generator")
    except DataError:
        found = None  # an unreadable manifest is just a stale cache: regenerate
    if found == wanted:
        return folder
    reason = "absent" if not (folder / MANIFEST).exists() else f"generated with other parameters ({found})"
    log.info("synthesising %s in %s: cache %s", what, folder, reason)
    return synth()


def _polymnist(root: Path, seed: int, progress: ProgressFn | None) -> Path:
    converted, raw = root / "polymnist", root / "PolyMNIST"
    if (converted / "train" / "m0.npy").is_file():
        return converted
    if (raw / "train" / "m0").is_dir():
        log.info("converting raw PolyMNIST %s to %s (once)", raw, converted)
        return convert_polymnist(raw, converted, seed=seed, progress=progress)
    raise DataError(
        "PolyMNIST not found (neither converted nor raw)",
        path=converted,
        fix=(
            f"put the unzipped PolyMNIST at {raw} (so that {raw}/train/m0/*.png exists), or run "
            "`cmvae-engine data convert polymnist SRC DST` and pass DST; nothing is downloaded at run time"
        ),
    )


def _facetdigits(root: Path, seed: int, progress: ProgressFn | None) -> Path:
    """The two-factor set of cmvae/data/facetdigits.py, synthesised on first use (and when its cache is stale)."""
    from cmvae_engine.cmvae.data.facetdigits import generator_params as facet_params
    from cmvae_engine.cmvae.data.facetdigits import synth_facetdigits

    folder = root / "facetdigits"
    return _cached(folder, facet_params(seed=seed), f"facetdigits (seed={seed})",
                   lambda: synth_facetdigits(folder, seed=seed, progress=progress))


def _polydigits_captions(root: Path, seed: int, progress: ProgressFn | None) -> Path:
    folder = root / captions.NAME
    return _cached(folder, captions.generator_params(seed=seed), f"{captions.NAME} (seed={seed})",
                   lambda: captions.synth_polydigits_captions(folder, seed=seed, progress=progress))
