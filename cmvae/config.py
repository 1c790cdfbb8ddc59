"""Model configuration."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import ClassVar

from cmvae_engine.cmvae.checks import ConfigError, Rule, check_fields, unknown_keys
from cmvae_engine.cmvae.distributions import FAMILIES

MODEL_KINDS = ("cmvae", "mmvaeplus")
IMAGE_CHANNELS = (1, 3)
"""Grey or RGB images: what the image grids, the coherence classifiers and FID take."""
MAX_LATENT = 4096
MAX_WIDTH = 8.0
MAX_CLUSTERS = 65536


@dataclass
class ModelConfig:
    """Architecture and prior of a CMVAE (or its K=1 special case, MMVAE+)."""

    kind: str = "cmvae"
    """`cmvae` (mixture prior over clusters) or `mmvaeplus` (one cluster with a fixed zero-mean prior)."""
    n_modalities: int = 5
    """Number of modalities M (>= 2)."""
    n_clusters: int = 40
    """Number of mixture components K (reference: 40, deliberately over-specified; prune selects)."""
    z_dim: int = 32
    """Shared latent dimension Dz."""
    w_dim: int = 32
    """Private latent dimension Dw (per modality)."""
    family: str = "laplace"
    """Latent distribution family: `laplace` (PolyMNIST) or `normal` (CUBICC)."""
    likelihood: str = "laplace"
    """Image likelihood family."""
    likelihood_scale: float = 0.75
    """Fixed scale of the image likelihood (reference PolyMNIST: Laplace 0.75)."""
    llik_scaling: float = 1.0
    """Multiplier of every modality's log-likelihood (reference PolyMNIST: 1.0)."""
    width: float = 1.0
    """Channel-width multiplier of the networks; 1.0 is the reference, anything smaller is reduced."""
    learn_scales: bool = False
    """Learn the cluster scales s_c (reference: fixed)."""
    prior_mean_init: float = 1.0
    """Cluster means start U(-a, a) (reference: 1.0 PolyMNIST, 0.5 CUBICC)."""
    image_channels: int = 3
    """Channels of every modality's images (1 grey, 3 RGB); the data decides it when training."""
    modalities: list | None = None
    """Heterogeneous data (images of other sizes, captions): one spec per modality ({"kind": "image", "channels",
    "size", "likelihood", "likelihood_scale", "llik_scaling"} or {"kind": "text", "length", "vocab_size", "pad_id",
    "end_id", "llik_scaling"}); the data decides it when training (cmvae/hetero.py). None: M alike 28x28 images."""

    FLAGS: ClassVar[dict[str, str]] = {"kind": "--model", "n_clusters": "--clusters", "z_dim": "--z-dim",
                                       "w_dim": "--w-dim", "family": "--family", "width": "--width",
                                       "learn_scales": "--learn-scales"}
    """The `cmvae-engine train` flag of each field that has one (messages name it)."""

    def __post_init__(self) -> None:
        check_fields(self, {"kind": Rule(MODEL_KINDS)}, section="model", flags=self.FLAGS)
        if self.kind == "mmvaeplus":
            self.n_clusters = 1
        latent = f"the reference uses 32; at {MAX_LATENT} the encoder heads alone hold 0.8 GB per modality"
        check_fields(self, {
            "n_modalities": Rule(int, low=2, fix="train on a data set with at least 2 modalities (m0.npy, m1.npy)"),
            "n_clusters": Rule(int, low=1, high=MAX_CLUSTERS, fix="pass e.g. --clusters 40 (the reference; prune "
                                                                    "selects from them)"),
            "z_dim": Rule(int, low=1, high=MAX_LATENT, fix=f"pass e.g. --z-dim 32 ({latent})"),
            "w_dim": Rule(int, low=1, high=MAX_LATENT, fix=f"pass e.g. --w-dim 32 ({latent})"),
            "family": Rule(FAMILIES), "likelihood": Rule(FAMILIES),
            "likelihood_scale": Rule(float, low=0, low_open=True), "llik_scaling": Rule(float, low=0, low_open=True),
            "width": Rule(float, low=0, low_open=True, high=MAX_WIDTH,
                          fix="pass e.g. --width 1.0 (the reference) or --width 0.125 (a reduced model for CPUs)"),
            "learn_scales": Rule(bool), "prior_mean_init": Rule(float, low=0),
            "image_channels": Rule(IMAGE_CHANNELS, fix="convert the images to grey (1 channel) or RGB (3 channels)"),
        }, section="model", flags=self.FLAGS)
        if self.modalities is not None:
            check_modality_specs(self.modalities, self.n_modalities)

    @property
    def reduced(self) -> bool:
        """True when the networks are narrower than the reference (results are then labelled reduced)."""
        return self.width < 1.0

    def to_dict(self) -> dict:
        return asdict(self)


_SPEC_FIELDS = {"image": {"kind", "channels", "size", "likelihood", "likelihood_scale", "llik_scaling"},
                "text": {"kind", "length", "vocab_size", "pad_id", "end_id", "llik_scaling"}}


def check_modality_specs(specs: list, n_modalities: int) -> None:
    """The model's per-modality specs (written by the training task from the data): shape and fields."""
    if not isinstance(specs, list) or len(specs) != n_modalities:
        raise ConfigError(f"model.modalities must be a list of {n_modalities} specs (one per modality)")
    for k, spec in enumerate(specs):
        kind = spec.get("kind") if isinstance(spec, dict) else None
        if kind not in _SPEC_FIELDS or set(spec) != _SPEC_FIELDS[kind]:
            want = " or ".join(sorted(f"{sorted(v)}" for v in _SPEC_FIELDS.values()))
            raise ConfigError(f"model.modalities[{k}] must hold exactly the keys {want}, got {spec!r}")


MODEL_CONFIGS: dict[str, type] = {"cmvae": ModelConfig, "mmvaeplus": ModelConfig}
"""The config class of each model kind; a new family adds its kind here (and its training task in engine/tasks/)."""


def _register_diffusion() -> None:
    from cmvae_engine.cmvae.diffusion.config import DiffusionConfig  # D-CMVAE's diffusion stage (cmvae/diffusion/)

    MODEL_CONFIGS["dcmvae"] = DiffusionConfig


_register_diffusion()


def model_config_from_dict(d: dict, where: str = "model"):
    """The config object of a saved model section (its `kind` picks the class; default `cmvae`); fields are
    checked by name and value (`where` names the file or section in messages)."""
    if not isinstance(d, dict):
        raise ConfigError(f"{where}: the model section must be a JSON object, got {type(d).__name__}")
    kind = d.get("kind", "cmvae")
    if kind not in MODEL_CONFIGS:
        raise ConfigError(f"{where}: unknown model kind {kind!r}; known kinds: {', '.join(MODEL_CONFIGS)}")
    cls = MODEL_CONFIGS[kind]
    unknown_keys(d, [f.name for f in fields(cls)], where)
    return cls(**d)


def _register_families() -> None:
    """Model families whose config lives in their own subpackage."""
    from cmvae_engine.cmvae.mfcvae.config import MFCVAEConfig

    MODEL_CONFIGS["mfcvae"] = MFCVAEConfig


_register_families()
