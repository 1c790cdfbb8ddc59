"""The model section of a D-CMVAE run (`kind` = "dcmvae"): the frozen CMVAE it sits on and the denoisers.

Defaults are the paper's / DiffuseVAE's settings (DESIGN section 7): base 64 UNet, T = 1000 linear betas
1e-4 .. 0.02, EMA 0.9999, learning-rate warm-up over 5000 steps. A base below 64 is a reduced denoiser and is
labelled so.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import ClassVar

from cmvae_engine.cmvae.checks import ConfigError, Rule, check_fields

PAPER_BASE = 64
DEFAULT_STRENGTH = 1.0
"""Sampling's default strength (sampling.py): 1, the paper's chains from pure noise."""
STRENGTH_RULE = Rule(float, low=0, low_open=True, high=1)


@dataclass
class DiffusionConfig:
    kind: str = "dcmvae"
    cmvae: dict = field(default_factory=dict)
    """The frozen CMVAE's model section (its config.json `model`); its weights come from `cmvae_checkpoint`
    when training starts and from this run's checkpoints afterwards."""
    cmvae_checkpoint: str | None = None
    """The checkpoint file the CMVAE weights were read from (pruned.pt when `prune` wrote one)."""
    n_modalities: int = 0
    """M: one denoiser per modality (the data decides it, as for the CMVAE)."""
    image_channels: int = 3
    base: int = PAPER_BASE
    """UNet base channel count (the paper: 64; `--base 16` is the reduced CPU denoiser)."""
    mults: list = field(default_factory=lambda: [1, 2, 2])
    """Channel multiplier per resolution level (32, 16, 8 pixels)."""
    n_res: int = 2
    """Residual blocks per level."""
    dropout: float = 0.1
    attention: bool = True
    """Self-attention in the middle block (8x8)."""
    timesteps: int = 1000
    beta_1: float = 1e-4
    beta_T: float = 0.02
    ema_decay: float = 0.9999
    """EMA decay of the denoisers' weights, capped early by (1 + n) / (10 + n) after n updates, so that a short run
    averages its recent steps rather than its initialisation."""
    p_cross: float = 0.5
    """Probability of a cross-reconstruction as x_hat (eq. 8: 1/2)."""
    warmup_steps: int = 5000
    """Linear learning-rate warm-up (DiffuseVAE: 5000 steps), then constant."""

    FLAGS: ClassVar[dict[str, str]] = {"base": "--base", "n_res": "--n-res", "dropout": "--dropout",
                                       "timesteps": "--timesteps", "ema_decay": "--ema-decay",
                                       "warmup_steps": "--warmup-steps"}

    def __post_init__(self) -> None:
        if self.kind != "dcmvae":
            raise ConfigError(f"model.kind: a diffusion config has kind 'dcmvae', got {self.kind!r}")
        if not isinstance(self.cmvae, dict):
            raise ConfigError("model.cmvae: must be the CMVAE's model section (a JSON object)")
        if self.cmvae.get("kind", "cmvae") not in ("cmvae", "mmvaeplus"):
            raise ConfigError(f"model.cmvae: the diffusion stage sits on a cmvae or mmvaeplus model, got "
                              f"{self.cmvae.get('kind')!r}")
        if (not isinstance(self.mults, (list, tuple)) or not self.mults
                or not all(isinstance(m, int) and 1 <= m <= 16 for m in self.mults) or len(self.mults) > 4):
            raise ConfigError(f"model.mults: 1 to 4 integers in 1..16 (one per 32/16/8/4-pixel level), got "
                              f"{self.mults!r}")
        self.mults = list(self.mults)
        check_fields(self, {
            "cmvae_checkpoint": Rule(str, optional=True), "n_modalities": Rule(int, low=0),
            "image_channels": Rule((1, 3)), "base": Rule(int, low=4, high=1024, fix="pass e.g. --base 64 (the "
                                                                                  "paper) or --base 16 (CPU)"),
            "n_res": Rule(int, low=1, high=8), "dropout": Rule(float, low=0, high=0.9), "attention": Rule(bool),
            "timesteps": Rule(int, low=1, high=100000), "beta_1": Rule(float, low=0, low_open=True),
            "beta_T": Rule(float, low=0, low_open=True, high=0.999),
            "ema_decay": Rule(float, low=0, high=1), "p_cross": Rule(float, low=0, high=1),
            "warmup_steps": Rule(int, low=1),
        }, section="model", flags=self.FLAGS)
        if self.beta_1 > self.beta_T:
            raise ConfigError(f"model.beta_1 {self.beta_1} > model.beta_T {self.beta_T}: the betas rise over time")

    @property
    def reduced(self) -> bool:
        return self.base < PAPER_BASE

    def to_dict(self) -> dict:
        return asdict(self)
