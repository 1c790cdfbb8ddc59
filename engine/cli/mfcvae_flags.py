"""The `cmvae-engine train` flags of MFCVAE: `--clusters K1,K2` (one K per facet), `--facets J` and
`--mfcvae-set key=value,...` for the other fields of its model config (cmvae/mfcvae/config.py)."""

from __future__ import annotations

from dataclasses import fields

from cmvae_engine.cmvae.checks import ConfigError
from cmvae_engine.cmvae.mfcvae.config import MFCVAEConfig
from cmvae_engine.engine.config import parse_key_values

_NOT_SETTABLE = ("kind", "n_facets", "n_clusters", "n_modalities", "image_channels", "image_size")


def parse_clusters(text: str | int) -> int | list[int]:
    """`40` -> 40; `25,25` -> [25, 25] (one per facet)."""
    if isinstance(text, int):
        return text
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise ConfigError(f"--clusters must be an integer K, or one per facet for mfcvae (K1,K2), got {text!r}. "
                          "Fix: pass e.g. --clusters 40, or --clusters 4,4 with --model mfcvae") from None
    if not values:
        raise ConfigError("--clusters is empty. Fix: pass e.g. --clusters 40")
    return values[0] if len(values) == 1 else values


def default_hidden(n_facets: int) -> list[int]:
    """Backbone widths, halving with depth from 512 (at least 64)."""
    return [max(64, 512 >> j) for j in range(n_facets)]


def parse_settings(text: str) -> dict:
    """`--mfcvae-set z_dims=5:5,solo_steps=800` -> {"z_dims": [5, 5], "solo_steps": 800} (lists colon-separated)."""
    defaults = {f.name: getattr(MFCVAEConfig(), f.name) for f in fields(MFCVAEConfig) if f.name not in _NOT_SETTABLE}
    return parse_key_values(text, defaults, "--mfcvae-set")


def mfcvae_model_config(flags: dict) -> MFCVAEConfig:
    """The model config of `--model mfcvae` from the parsed train flags."""
    j = flags["facets"]
    settings = parse_settings(flags.get("mfcvae_set") or "")
    settings.setdefault("z_dims", 5)
    settings.setdefault("hidden", default_hidden(j))
    return MFCVAEConfig(n_facets=j, n_clusters=flags["clusters"], **settings)
