"""Training configuration: nested dataclasses, one docstring per field, cross-field checks."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from cmvae.config import ModelConfig
from cmvae.objectives import OBJECTIVES


@dataclass
class DataConfig:
    dataset: str = "polydigits"
    """A built-in name (`polydigits`, `polymnist`) or a folder in the project's data format."""
    data_root: str | None = None
    """Where named data sets live (default: $CMVAE_DATA_DIR or ./data)."""
    loader: str = "resident"
    """How batches reach the step: `resident` (whole data set as uint8 tensors on the device)."""
    drop_last: bool = False
    """Drop the last partial batch (the reference keeps it)."""


@dataclass
class OptimConfig:
    lr: float = 1e-3
    """Adam learning rate (reference 1e-3, no schedule)."""
    amsgrad: bool = True
    """AMSGrad variant (reference: on)."""
    batch_size: int = 128
    """Tuples per step (reference 128)."""
    epochs: int = 250
    """Passes over the training split (reference 250 for PolyMNIST)."""
    max_steps: int | None = None
    """Stop after this many optimiser steps, whatever the epoch count (for short checks)."""


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    recipe: str = "paper"
    """`paper` reproduces the reference procedure exactly."""
    objective: str = "iwae"
    """`iwae` (reference behaviour; S=1 is the ELBO) or `dreg` (correct DReG estimator)."""
    n_samples: int = 1
    """Importance samples S per datapoint and source modality."""
    beta: float = 2.5
    """Weight of the latent terms (reference PolyMNIST 2.5)."""
    seed: int = 0
    """Seeds parameters, sampling and data order."""
    device: str = "auto"
    """`auto` (CUDA when present), `cpu`, `cuda`, `cuda:N`."""
    out: str = "runs/latest"
    """Run folder: metrics.jsonl, checkpoints, images."""
    log_every: int = 20
    """Steps between host reads of the loss (the only sync points of the loop)."""
    eval_every: int = 1
    """Epochs between test-split evaluations (bound and clustering scores); 0 disables them."""
    threads: int | None = None
    """CPU threads for torch (default: torch's choice)."""

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.n_samples < 1:
            raise ValueError(f"n_samples must be >= 1, got {self.n_samples}")
        if self.optim.batch_size < 1 or self.optim.epochs < 1:
            raise ValueError("batch_size and epochs must be >= 1")
        if self.beta < 0:
            raise ValueError(f"beta must be >= 0, got {self.beta}")

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        d = dict(d)
        return cls(
            model=ModelConfig(**d.pop("model")),
            data=DataConfig(**d.pop("data")),
            optim=OptimConfig(**d.pop("optim")),
            **d,
        )
