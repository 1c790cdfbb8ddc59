"""Training configuration: nested dataclasses, one docstring per field, cross-field checks."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields

from cmvae_engine.cmvae.config import ModelConfig, model_config_from_dict
from cmvae_engine.cmvae.objectives import OBJECTIVES
from cmvae_engine.engine.loaders import DEFAULT_SHUFFLE_BUFFER, LOADERS
from cmvae_engine.engine.logsinks import parse_sinks
from cmvae_engine.kernels import BACKENDS as KERNEL_BACKENDS


@dataclass
class DataConfig:
    dataset: str = "polydigits"
    """A built-in name (`polydigits`, `polymnist`) or a folder in the project's data format."""
    data_root: str | None = None
    """Where named data sets live (default: $CMVAE_DATA_DIR or ./data)."""
    loader: str = "resident"
    """How batches reach the step: `resident` (whole split as uint8 on the device), `files` (naive baseline:
    per-item .npy reads in DataLoader workers), `webdataset` (streaming tar shards), `dali` (NVIDIA DALI)."""
    drop_last: bool = False
    """Drop the last partial batch (the reference keeps it)."""
    shard_dir: str | None = None
    """Folder written by `cmvae-engine data shard` (webdataset; dali reads shards when set, else the .npy
    files); default DATASET_FOLDER/shards for webdataset."""
    workers: int = 2
    """Loader worker processes (files, webdataset; capped at the shard count) or DALI threads."""
    shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER
    """Tuples in each streaming worker's shuffle buffer (webdataset, dali over shards); 0 reads in shard order."""

    def __post_init__(self) -> None:
        if self.loader not in LOADERS:
            raise ValueError(f"loader (--loader) must be one of {LOADERS}, got {self.loader!r}")
        if self.workers < 0 or self.shuffle_buffer < 0:
            raise ValueError(f"workers ({self.workers}) and shuffle_buffer ({self.shuffle_buffer}) must be >= 0")


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
    grad_clip: float | None = None
    """Clip the global gradient norm to this value before each update (reference CMVAE: none)."""

    def __post_init__(self) -> None:
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"grad_clip must be > 0 (or None for no clipping), got {self.grad_clip}")


AMP_DTYPES = ("bf16", "fp16")


@dataclass
class StepConfig:
    """How the training step runs; none of these changes the objective (the loss curve matches to tolerance)."""

    amp: bool | None = None
    """Autocast the encoder and decoder networks (the probabilistic core stays fp32); None: on for CUDA, off on CPU."""
    amp_dtype: str = "bf16"
    """`bf16` (no loss scaling needed) or `fp16` (with a GradScaler)."""
    compile: bool = False
    """torch.compile the model and loss (fullgraph, static shapes: the last partial batch is dropped)."""
    cuda_graphs: bool = False
    """Replay the compiled step as CUDA graphs (torch.compile mode `reduce-overhead`); needs compile and CUDA."""
    channels_last: bool | None = None
    """channels_last weights and inputs for the convolutions; None: on for CUDA, off on CPU."""
    cudnn_benchmark: bool = True
    """Let cuDNN pick the fastest convolution algorithms for the (static) shapes; CUDA only."""
    fused_adam: bool | None = None
    """Fused Adam kernel (same update as the reference's amsgrad Adam); None: on for CUDA."""
    decode_per_pair: bool = False
    """One decoder call per (source, target) pair as the reference (M*M calls) instead of M batched calls."""

    def __post_init__(self) -> None:
        if self.amp_dtype not in AMP_DTYPES:
            raise ValueError(f"amp_dtype (--amp-dtype) must be one of {AMP_DTYPES}, got {self.amp_dtype!r}")
        if self.cuda_graphs and not self.compile:
            raise ValueError("cuda_graphs (--cuda-graphs) needs compile (--compile): the graphs are captured "
                             "through torch.compile's reduce-overhead mode")


@dataclass
class CheckpointConfig:
    every: int = 0
    """Steps between checkpoints (0: only at epoch ends and when stopped); epoch ends always write one."""
    keep: int = 3
    """How many `ckpt-{step}.pt` files to keep (the newest); `checkpoint.pt` is always the latest."""

    def __post_init__(self) -> None:
        if self.every < 0:
            raise ValueError(f"checkpoint every (--checkpoint-every) must be >= 0, got {self.every}")
        if self.keep < 1:
            raise ValueError(f"keep (--keep) must be >= 1, got {self.keep}")


FAST_ELEMENTS = ("contrast", "init", "refit", "prior-lr", "beta-warmup", "lr-scale")


@dataclass
class FastRecipeConfig:
    """The `fast` recipe (docs/recipes.md). Every element switches off on its own; `paper` uses none of them."""

    contrast: bool = True
    """Contrastive warm start of the z towers before the first step, faded out over the first steps
    (element `contrast`, engine/warm_start.py)."""
    init: bool = True
    """Fit the mixture prior (means, weights and, if learned, scales) by k-means to the posterior means of z pooled
    over modalities, once the label-free trigger fires (element `init`)."""
    refit: bool = True
    """Fit the prior again when the clusters in use collapse after a fit (element `refit`)."""
    prior_lr: bool = True
    """Train the prior's parameters at prior_lr_mult x lr from the first fit on (element `prior-lr`)."""
    beta_warmup: bool = False
    """Ramp beta linearly from beta_start x beta to beta over warmup_steps (element `beta-warmup`); the
    objective ends at the configured beta."""
    lr_scale: bool = False
    """Train the networks at lr_mult x lr (element `lr-scale`)."""
    probe_size: int = 1024
    """Training tuples (a fixed random subset) encoded at each check; their posterior means feed k-means."""
    check_every: int = 25
    """Steps between checks (trigger before the first fit, collapse detection after it)."""
    min_steps: int = 50
    """No fit before this step."""
    agree_min: float = 0.3
    """The trigger: cross-modal agreement (mean pairwise ARI between the modalities' k-means assignments of the
    same tuples; 0 by chance) must be at least this ..."""
    agree_plateau: float = 0.02
    """... and have risen by less than this since the previous check (it has levelled off)."""
    max_wait_steps: int = 2000
    """Fit at this step whatever the trigger says (a fallback for data where the agreement stays low)."""
    prior_lr_mult: float = 10.0
    """Learning-rate multiplier of the prior's parameters after the first fit."""
    lr_mult: float = 2.0
    """Learning-rate multiplier of the networks (with lr_scale)."""
    beta_start: float = 0.5
    """beta at step 0 as a fraction of the configured beta (with beta_warmup)."""
    warmup_steps: int = 200
    """Steps of the beta ramp (with beta_warmup)."""
    collapse_frac: float = 0.5
    """Refit when the clusters in use fall below this fraction of those in use right after the last fit."""
    min_share: float = 0.005
    """A cluster is in use when it is the most probable cluster of at least this share of the probe's points."""
    max_refits: int = 3
    """At most this many refits per run."""
    kmeans_restarts: int = 4
    """k-means restarts per fit (the lowest inertia wins)."""
    contrast_steps: int = 800
    """Warm-start steps of cross-modal InfoNCE on the z towers alone (with contrast)."""
    contrast_lr: float = 3e-3
    """Adam (amsgrad) learning rate of the warm start."""
    contrast_tau: float = 0.2
    """InfoNCE temperature (cosine similarities are divided by it)."""
    contrast_spread: float = 2.0
    """RMS spread per dimension given to each modality's centred posterior means after the warm start."""
    contrast_weight: float = 500.0
    """InfoNCE weight at the first CMVAE step, per tuple (the objective is ~1e4 nats per tuple); falls to 0 ..."""
    contrast_anneal_steps: int = 600
    """... linearly over this many CMVAE steps (0: no InfoNCE once the CMVAE objective starts)."""

    def __post_init__(self) -> None:
        ints = {"probe_size": 2, "check_every": 1, "min_steps": 0, "max_wait_steps": 0, "warmup_steps": 1,
                "max_refits": 0, "kmeans_restarts": 1, "contrast_steps": 0, "contrast_anneal_steps": 0}
        for name, low in ints.items():
            if getattr(self, name) < low:
                raise ValueError(f"fast recipe: {name} must be >= {low}, got {getattr(self, name)}")
        for name in ("prior_lr_mult", "lr_mult", "beta_start", "contrast_lr", "contrast_tau", "contrast_spread"):
            if not getattr(self, name) > 0:
                raise ValueError(f"fast recipe: {name} must be > 0, got {getattr(self, name)}")
        for name in ("agree_min", "collapse_frac", "min_share"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"fast recipe: {name} must be in [0, 1], got {getattr(self, name)}")
        if self.contrast_weight < 0:
            raise ValueError(f"fast recipe: contrast_weight must be >= 0, got {self.contrast_weight}")

    def active(self) -> list[str]:
        """Names of the switched-on elements, in FAST_ELEMENTS order."""
        on = {"contrast": self.contrast, "init": self.init, "refit": self.refit and self.init,
              "prior-lr": self.prior_lr and self.init, "beta-warmup": self.beta_warmup, "lr-scale": self.lr_scale}
        return [e for e in FAST_ELEMENTS if on[e]]

    @classmethod
    def from_flags(cls, disable: str = "", enable: str = "", settings: str = "") -> FastRecipeConfig:
        """From the CLI: `--fast-disable a,b` and `--fast-enable a,b` name elements (FAST_ELEMENTS);
        `--fast-set key=value,...` sets the numeric fields (e.g. `check_every=50,prior_lr_mult=5`)."""
        kw: dict = {}
        for flag, names, on in (("--fast-disable", disable, False), ("--fast-enable", enable, True)):
            for n in (x.strip() for x in names.split(",")):
                if not n:
                    continue
                if n not in FAST_ELEMENTS:
                    raise ValueError(f"{flag}: unknown element {n!r}; choose from {', '.join(FAST_ELEMENTS)}")
                kw[n.replace("-", "_")] = on
        switches = {e.replace("-", "_") for e in FAST_ELEMENTS}
        types = {f.name: type(getattr(cls(), f.name)) for f in fields(cls) if f.name not in switches}
        for item in (x.strip() for x in settings.split(",")):
            if not item:
                continue
            key, sep, value = item.partition("=")
            key = key.strip().replace("-", "_")
            if not sep or key not in types:
                raise ValueError(f"--fast-set: expected key=value with key one of {', '.join(sorted(types))}, "
                                 f"got {item!r}")
            try:
                kw[key] = types[key](value)
            except ValueError:
                raise ValueError(f"--fast-set: {key} needs a {types[key].__name__}, got {value!r}") from None
        return cls(**kw)


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    """The model family (`kind`) and its architecture; each kind has its config class (cmvae/config.py) and its
    training task (engine/tasks/)."""
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    step: StepConfig = field(default_factory=StepConfig)
    """Speed options of the training step."""
    ckpt: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpoint cadence and retention."""
    recipe: str = "paper"
    """`paper` reproduces the reference procedure exactly; `fast` adds the elements of `fast` (docs/recipes.md)."""
    fast: FastRecipeConfig = field(default_factory=FastRecipeConfig)
    """Settings of the `fast` recipe (ignored under `paper`)."""
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
    log: list[str] = field(default_factory=list)
    """Optional logging sinks besides metrics.jsonl and steps.jsonl: `tensorboard`, `wandb` (engine/logsinks.py)."""
    eval_every: int = 1
    """Epochs between test-split evaluations (bound and clustering scores); 0 disables them."""
    threads: int | None = None
    """CPU threads for torch (default: torch's choice)."""
    kernels: str = "auto"
    """Backend of the fused ops: `auto` (triton on CUDA, the C++ extension on CPU, else torch), `torch` (the
    plain-torch reference), `triton` or `ext`; the CLI flag defaults to $CMVAE_KERNELS."""
    resume: bool = False
    """Continue the run in `out` from its latest checkpoint (model, optimiser, RNG, data order, step)."""
    nproc: int = 1
    """Processes (GPUs) of data-parallel training; > 1 re-launches through torch.distributed.run."""

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.n_samples < 1:
            raise ValueError(f"n_samples must be >= 1, got {self.n_samples}")
        if self.optim.batch_size < 1 or self.optim.epochs < 1:
            raise ValueError("batch_size and epochs must be >= 1")
        if self.beta < 0:
            raise ValueError(f"beta must be >= 0, got {self.beta}")
        if self.kernels not in KERNEL_BACKENDS:
            raise ValueError(f"kernels (--kernels) must be one of {KERNEL_BACKENDS}, got {self.kernels!r}")
        if self.nproc < 1:
            raise ValueError(f"nproc (--nproc) must be >= 1, got {self.nproc}")
        self.log = parse_sinks(self.log)
        if self.nproc > 1 and self.optim.batch_size % self.nproc:
            raise ValueError(f"batch_size {self.optim.batch_size} is the global batch and must be divisible by "
                             f"nproc {self.nproc}; choose a multiple of {self.nproc}")

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        d = dict(d)
        return cls(
            model=model_config_from_dict(d.pop("model")),
            data=DataConfig(**d.pop("data")),
            optim=OptimConfig(**d.pop("optim")),
            step=StepConfig(**d.pop("step", {})),
            ckpt=CheckpointConfig(**d.pop("ckpt", {})),
            fast=FastRecipeConfig(**d.pop("fast", {})),
            **d,
        )
