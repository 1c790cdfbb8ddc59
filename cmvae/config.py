"""Model configuration."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from cmvae_engine.cmvae.distributions import FAMILIES

MODEL_KINDS = ("cmvae", "mmvaeplus")


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

    def __post_init__(self) -> None:
        if self.kind not in MODEL_KINDS:
            raise ValueError(f"model kind must be one of {MODEL_KINDS}, got {self.kind!r}")
        if self.kind == "mmvaeplus":
            self.n_clusters = 1
        if self.n_modalities < 2:
            raise ValueError(f"a multimodal model needs at least 2 modalities, got {self.n_modalities}")
        if self.n_clusters < 1:
            raise ValueError(f"n_clusters must be >= 1, got {self.n_clusters}")
        for field in ("family", "likelihood"):
            if getattr(self, field) not in FAMILIES:
                raise ValueError(f"{field} must be one of {FAMILIES}, got {getattr(self, field)!r}")
        if not self.width > 0:
            raise ValueError(f"width must be positive, got {self.width}")

    @property
    def reduced(self) -> bool:
        """True when the networks are narrower than the reference (results are then labelled reduced)."""
        return self.width < 1.0

    def to_dict(self) -> dict:
        return asdict(self)


MODEL_CONFIGS: dict[str, type] = {"cmvae": ModelConfig, "mmvaeplus": ModelConfig}
"""The config class of each model kind; a new family adds its kind here (and its training task in engine/tasks/)."""


def model_config_from_dict(d: dict):
    """The config object of a saved model section (its `kind` picks the class; default `cmvae`)."""
    kind = d.get("kind", "cmvae")
    if kind not in MODEL_CONFIGS:
        raise ValueError(f"unknown model kind {kind!r}; known kinds: {', '.join(MODEL_CONFIGS)}")
    return MODEL_CONFIGS[kind](**d)
