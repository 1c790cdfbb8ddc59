"""Configuration of an MFCVAE: facets, their clusters and latent sizes, the ladder networks and the progressive
training schedule."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import ClassVar

from cmvae_engine.cmvae.checks import ConfigError, Rule, check_fields

MAX_FACETS = 8


@dataclass
class MFCVAEConfig:
    """Facet j branches off the encoder backbone after block j (facet 0 the shallowest) and joins the decoder
    at the mirrored depth; every list field holds one entry per facet."""

    kind: str = "mfcvae"
    n_facets: int = 2
    """Facets J (each one clustering of the data)."""
    n_clusters: list[int] = field(default_factory=lambda: [4, 4])
    """Clusters K_j of each facet's mixture prior."""
    z_dims: list[int] = field(default_factory=lambda: [5, 5])
    """Latent size of each facet (the released MNIST model: 5, 5)."""
    hidden: list[int] = field(default_factory=lambda: [512, 256])
    """Width of the encoder backbone block after which each facet branches (mirrored in the decoder)."""
    likelihood_scale: float = 0.3
    """Fixed std of the Gaussian pixel likelihood on [0, 1] (the released SVHN model: 0.3 after a sigmoid)."""
    rung_scale: float = 0.1
    """A shallower facet's decoder rung is added to the backbone times this (the released code: 0.1)."""
    learn_pi: bool = True
    """Learn the cluster weights pi_j (initialised uniform); False keeps them uniform."""
    prior_var_init: float = 0.01
    """Initial variance of every cluster (diagonal, through softplus with beta 10, as released)."""
    gmm_init: bool = True
    """Before the first step, set each facet's cluster means (and weights) from a diagonal Gaussian mixture fitted
    to the untrained encoder's posterior means of the training set (as released)."""
    refit: bool = False
    """Ours, not the released code's: fit each facet's mixture (means, variances, weights) again once its head has
    trained, by a diagonal Gaussian mixture on its posterior means: the deepest facet at the end of its solo phase,
    each shallower one when its fade-in ends. The initial fit sees the untrained encoder, and a shallower facet's
    head only starts learning at its fade-in."""
    refit_every: int = 0
    """With `refit`: after the progressive schedule, fit every facet's mixture again every this many steps (0:
    never). Gradient steps move a mixture prior slowly, and one that has merged two clusters and split a third
    stays so while a fresh fit to the same posterior means finds the clusters."""
    solo_steps: int = 600
    """Progressive training: steps in which the deepest facet trains alone."""
    fade_steps: int = 600
    """Steps over which each next (shallower) facet's decoder rung and KL weights rise linearly 0 -> 1."""
    n_modalities: int = 1
    """Image modalities (MFCVAE is unimodal: 1); the data decides it."""
    image_channels: int = 3
    """Channels of the images; the data decides it."""
    image_size: int = 28
    """Height and width of the images; the data decides it."""

    FLAGS: ClassVar[dict[str, str]] = {"kind": "--model", "n_facets": "--facets", "n_clusters": "--clusters"}

    def __post_init__(self) -> None:
        check_fields(self, {
            "kind": Rule(("mfcvae",)),
            "n_facets": Rule(int, low=1, high=MAX_FACETS, fix="pass e.g. --facets 2"),
            "likelihood_scale": Rule(float, low=0, low_open=True), "rung_scale": Rule(float, low=0),
            "learn_pi": Rule(bool), "prior_var_init": Rule(float, low=0, low_open=True), "gmm_init": Rule(bool),
            "refit": Rule(bool), "refit_every": Rule(int, low=0),
            "solo_steps": Rule(int, low=0), "fade_steps": Rule(int, low=0),
            "n_modalities": Rule((1,), fix="train MFCVAE on a single-modality data set (m0.npy alone)"),
            "image_channels": Rule(int, low=1, high=64), "image_size": Rule(int, low=4, high=4096),
        }, section="model", flags=self.FLAGS)
        for name in ("n_clusters", "z_dims", "hidden"):  # one integer: the same for every facet
            value = getattr(self, name)
            if isinstance(value, int) and not isinstance(value, bool):
                setattr(self, name, [value] * self.n_facets)
        for name, low, flag in (("n_clusters", 1, "--clusters K1,K2"), ("z_dims", 1, None), ("hidden", 1, None)):
            value = getattr(self, name)
            where = f"{flag} (model.{name})" if flag else f"model.{name}"
            if not isinstance(value, list | tuple) or len(value) != self.n_facets or not all(
                    isinstance(v, int) and not isinstance(v, bool) and v >= low for v in value):
                raise ConfigError(f"{where} must list {self.n_facets} integers >= {low} (one per facet), got "
                                  f"{value!r}. Fix: give one value per facet, e.g. "
                                  f"{','.join(['4'] * self.n_facets)}")
            setattr(self, name, [int(v) for v in value])

    @property
    def reduced(self) -> bool:
        return False

    def to_dict(self) -> dict:
        return asdict(self)
