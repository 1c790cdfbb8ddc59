"""Training configuration: nested dataclasses, one docstring per field, every field checked in
`__post_init__` through cmvae/checks.py (the same checks guard the command line, the Python API and the configs
read back from run folders and checkpoints)."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, fields
from typing import ClassVar

from cmvae_engine.cmvae.checks import SEED, THREADS, ConfigError, Rule, check_fields, unknown_keys
from cmvae_engine.cmvae.config import ModelConfig, model_config_from_dict
from cmvae_engine.cmvae.objectives import OBJECTIVES
from cmvae_engine.engine.loaders import DEFAULT_SHUFFLE_BUFFER, LOADERS
from cmvae_engine.engine.logsinks import parse_sinks
from cmvae_engine.kernels import BACKENDS as KERNEL_BACKENDS

RECIPES = ("paper", "fast")
_DEVICE = re.compile(r"^(auto|cpu|cuda(:(0|[1-9][0-9]*))?)$")


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

    FLAGS: ClassVar[dict[str, str]] = {"dataset": "DATASET", "data_root": "--data-root", "loader": "--loader",
                                       "drop_last": "--drop-last", "shard_dir": "--shard-dir", "workers": "--workers",
                                       "shuffle_buffer": "--shuffle-buffer"}

    def __post_init__(self) -> None:
        check_fields(self, {
            "dataset": Rule(str, fix="pass `polydigits`, `polymnist` or a data folder"),
            "data_root": Rule(str, optional=True), "loader": Rule(LOADERS), "drop_last": Rule(bool),
            "shard_dir": Rule(str, optional=True), "workers": Rule(int, low=0, high=1024),
            "shuffle_buffer": Rule(int, low=0),
        }, section="data", flags=self.FLAGS)


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

    FLAGS: ClassVar[dict[str, str]] = {"lr": "--lr", "amsgrad": "--amsgrad/--no-amsgrad", "batch_size": "--batch-size",
                                       "epochs": "--epochs", "max_steps": "--max-steps"}

    def __post_init__(self) -> None:
        check_fields(self, {
            "lr": Rule(float, low=0, low_open=True, fix="pass e.g. --lr 1e-3 (the reference)"),
            "amsgrad": Rule(bool), "batch_size": Rule(int, low=1), "epochs": Rule(int, low=1),
            "max_steps": Rule(int, low=1, optional=True, fix="pass --max-steps 1 or more, or leave it out to train "
                                                             "for --epochs"),
            "grad_clip": Rule(float, low=0, low_open=True, optional=True),
        }, section="optim", flags=self.FLAGS)


AMP_DTYPES = ("bf16", "fp16")


@dataclass
class StepConfig:
    """How the training step runs; none of these changes the objective (the loss curve matches to tolerance)."""

    amp: bool | None = None
    """Autocast the encoder and decoder networks (the probabilistic core stays fp32); None: on for CUDA and for
    CPUs with AMX bf16, off on other CPUs (engine/step.py, auto_amp)."""
    amp_dtype: str = "bf16"
    """`bf16` (no loss scaling needed) or `fp16` (with a GradScaler)."""
    compile: bool = False
    """torch.compile the model and loss (fullgraph, static shapes: the last partial batch is dropped)."""
    cuda_graphs: bool = False
    """Replay the compiled step as CUDA graphs (torch.compile mode `reduce-overhead`); needs compile and CUDA."""
    channels_last: bool | None = None
    """channels_last weights and inputs for the convolutions; None: on (CUDA and CPU: faster on both measured)."""
    cudnn_benchmark: bool = True
    """Let cuDNN pick the fastest convolution algorithms for the (static) shapes; CUDA only."""
    fused_adam: bool | None = None
    """Fused Adam kernel (same update as the reference's amsgrad Adam); None: on for CUDA."""
    decode_per_pair: bool | None = None
    """One decoder call per (source, target) pair as the reference (M*M calls) instead of M batched calls; same
    values. None: per pair on CPU (a batch of M*S*B rows runs slower per row there than M*M calls of S*B rows:
    docs/step_cpu.md), batched on CUDA (fewer launches)."""
    batch_encoders: bool | None = None
    """All 2M encoder towers as one grouped computation (cmvae/grouped_encoders.py) instead of 2M calls; same
    values to rounding, same checkpoints. None: on for CUDA (fewer launches), off on CPU (oneDNN's grouped
    convolutions ran slower than the separate towers on the idle CPU measured: docs/step_cpu.md)."""

    FLAGS: ClassVar[dict[str, str]] = {"amp": "--amp/--no-amp", "amp_dtype": "--amp-dtype", "compile": "--compile",
                                       "cuda_graphs": "--cuda-graphs", "channels_last": "--channels-last",
                                       "decode_per_pair": "--per-pair-decoders/--batched-decoders",
                                       "batch_encoders": "--batch-encoders/--no-batch-encoders"}

    def __post_init__(self) -> None:
        optional_bool = Rule(bool, optional=True)
        check_fields(self, {
            "amp": optional_bool, "amp_dtype": Rule(AMP_DTYPES), "compile": Rule(bool), "cuda_graphs": Rule(bool),
            "channels_last": optional_bool, "cudnn_benchmark": Rule(bool), "fused_adam": optional_bool,
            "decode_per_pair": optional_bool, "batch_encoders": optional_bool,
        }, section="step", flags=self.FLAGS)
        if self.cuda_graphs and not self.compile:
            raise ConfigError("--cuda-graphs (step.cuda_graphs) needs --compile: the graphs are captured through "
                              "torch.compile's reduce-overhead mode. Fix: add --compile, or drop --cuda-graphs")


@dataclass
class CheckpointConfig:
    every: int = 0
    """Steps between checkpoints (0: only at epoch ends and when stopped); epoch ends always write one."""
    keep: int = 3
    """How many `ckpt-{step}.pt` files to keep (the newest); `checkpoint.pt` is always the latest."""

    FLAGS: ClassVar[dict[str, str]] = {"every": "--checkpoint-every", "keep": "--keep"}

    def __post_init__(self) -> None:
        check_fields(self, {"every": Rule(int, low=0), "keep": Rule(int, low=1)}, section="ckpt", flags=self.FLAGS)


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
    contrast_weight: float = 1000.0
    """InfoNCE weight at the first CMVAE step, per tuple (the objective is ~1e4 nats per tuple;
    chosen on the valid split, docs/recipes.md); falls to 0 ..."""
    contrast_anneal_steps: int = 600
    """... linearly over this many CMVAE steps (0: no InfoNCE once the CMVAE objective starts)."""

    def __post_init__(self) -> None:
        rules = {e.replace("-", "_"): Rule(bool) for e in FAST_ELEMENTS}
        ints = {"probe_size": 2, "check_every": 1, "min_steps": 0, "max_wait_steps": 0, "warmup_steps": 1,
                "max_refits": 0, "kmeans_restarts": 1, "contrast_steps": 0, "contrast_anneal_steps": 0}
        positive = ("prior_lr_mult", "lr_mult", "beta_start", "contrast_lr", "contrast_tau", "contrast_spread")
        fractions = ("agree_min", "agree_plateau", "collapse_frac", "min_share")
        defaults = FastRecipeConfig.__dataclass_fields__

        def fix(name: str) -> str:
            return f"pass e.g. --fast-set {name}={defaults[name].default}"

        rules.update({n: Rule(int, low=low, fix=fix(n)) for n, low in ints.items()})
        rules.update({n: Rule(float, low=0, low_open=True, fix=fix(n)) for n in positive})
        rules.update({n: Rule(float, low=0, high=1, fix=fix(n)) for n in fractions})
        rules["contrast_weight"] = Rule(float, low=0, fix=fix("contrast_weight"))
        check_fields(self, rules, section="fast")

    def active(self) -> list[str]:
        """Names of the switched-on elements, in FAST_ELEMENTS order."""
        on = {"contrast": self.contrast, "init": self.init, "refit": self.refit and self.init,
              "prior-lr": self.prior_lr and self.init, "beta-warmup": self.beta_warmup, "lr-scale": self.lr_scale}
        return [e for e in FAST_ELEMENTS if on[e]]

    @classmethod
    def from_flags(cls, disable: str = "", enable: str = "", settings: str = "",
                   base: FastRecipeConfig | None = None) -> FastRecipeConfig:
        """From the CLI: `--fast-disable a,b` and `--fast-enable a,b` name elements (FAST_ELEMENTS);
        `--fast-set key=value,...` sets the numeric fields (e.g. `check_every=50,prior_lr_mult=5`). Fields the flags
        do not name come from `base` (default: the defaults)."""
        kw: dict = asdict(base) if base is not None else {}
        for flag, names, on in (("--fast-disable", disable, False), ("--fast-enable", enable, True)):
            for n in (x.strip() for x in names.split(",")):
                if not n:
                    continue
                if n not in FAST_ELEMENTS:
                    raise ConfigError(f"{flag}: unknown element {n!r}. Fix: choose from {', '.join(FAST_ELEMENTS)}")
                kw[n.replace("-", "_")] = on
        switches = {e.replace("-", "_") for e in FAST_ELEMENTS}
        defaults = {f.name: getattr(cls(), f.name) for f in fields(cls) if f.name not in switches}
        kw.update(parse_key_values(settings, defaults, "--fast-set", keys_hint=" (docs/recipes.md)"))
        return cls(**kw)


def parse_key_values(text: str, defaults: dict, flag: str, keys_hint: str = "") -> dict:
    """A `key=value,...` settings flag (`--fast-set`, `--mfcvae-set`) -> {field: value}, each value parsed as the type
    of its default in `defaults` (the settable fields): lists are colon-separated integers (one per facet), booleans
    true/false/1/0. Dashes in keys read as underscores. A bad item is a ConfigError naming the flag and the fix."""
    out: dict = {}
    for item in (x.strip() for x in text.split(",")):
        if not item:
            continue
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in defaults:
            raise ConfigError(f"{flag}: expected key=value, got {item!r}. Fix: use keys among "
                              f"{', '.join(sorted(defaults))}{keys_hint}")
        kind = type(defaults[key])
        try:
            if kind is list:
                out[key] = [int(v) for v in value.split(":")]
            elif kind is bool:
                if value.lower() not in ("true", "false", "1", "0"):
                    raise ValueError
                out[key] = value.lower() in ("true", "1")
            else:
                out[key] = kind(value)
        except ValueError:
            example = defaults[key]
            example = ":".join(map(str, example)) if kind is list else str(example).lower() if kind is bool \
                else str(example)
            raise ConfigError(f"{flag}: {key} needs a {kind.__name__}"
                              f"{' (colon-separated integers, one per facet)' if kind is list else ''}, got "
                              f"{value!r}. Fix: pass e.g. {flag} {key}={example}") from None
    return out


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
    log: str = ""
    """Optional logging sinks besides metrics.jsonl and steps.jsonl, comma-separated: `tensorboard`, `wandb`
    (engine/logsinks.py); '' for none."""
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

    overwrite: bool = False
    """Replace a run already in `out` (its checkpoints, metrics and outputs) instead of refusing to train there."""

    FLAGS: ClassVar[dict[str, str]] = {
        "recipe": "--recipe", "objective": "--objective", "n_samples": "--samples", "beta": "--beta", "seed": "--seed",
        "device": "--device", "out": "--out", "log_every": "--log-every", "eval_every": "--eval-every",
        "threads": "--threads", "kernels": "--kernels", "resume": "--resume", "nproc": "--nproc",
        "overwrite": "--overwrite", "log": "--log"}
    SECTIONS: ClassVar[dict[str, type]] = {"model": ModelConfig, "data": DataConfig, "optim": OptimConfig,
                                           "step": StepConfig, "ckpt": CheckpointConfig, "fast": FastRecipeConfig}

    def __post_init__(self) -> None:
        for name, cls in self.SECTIONS.items():
            if not isinstance(getattr(self, name), cls) and not (name == "model" and hasattr(self.model, "kind")):
                raise ConfigError(f"{name} must be a {cls.__name__}, got {type(getattr(self, name)).__name__}")
        check_fields(self, {
            "recipe": Rule(RECIPES), "objective": Rule(OBJECTIVES), "n_samples": Rule(int, low=1, high=4096),
            "beta": Rule(float, low=0), "seed": SEED, "device": Rule(str),
            "out": Rule(str, fix="pass --out with a folder for the run"), "log_every": Rule(int, low=1),
            "eval_every": Rule(int, low=0), "kernels": Rule(KERNEL_BACKENDS),
            "threads": THREADS,
            "resume": Rule(bool), "overwrite": Rule(bool), "nproc": Rule(int, low=1, high=4096),
        }, flags=self.FLAGS)
        if not _DEVICE.match(self.device):
            raise ConfigError(f"--device (device) must be auto, cpu, cuda or cuda:N, got {self.device!r}. Fix: pass "
                              "e.g. --device cpu")
        if self.resume and self.overwrite:
            raise ConfigError("--resume and --overwrite contradict each other: --resume continues the run in --out, "
                              "--overwrite replaces it. Fix: pass one of them")
        self.log = ",".join(parse_sinks(self.log))  # checked and canonical: "tensorboard,wandb"
        if self.nproc > 1 and self.optim.batch_size % self.nproc:
            raise ConfigError(f"--batch-size {self.optim.batch_size} is the global batch and must be divisible by "
                              f"--nproc {self.nproc}. Fix: choose a multiple of {self.nproc}")

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict, where: str = "config") -> TrainConfig:
        """A config from its to_dict() form (a run's config.json or checkpoint), every section and field checked:
        unknown fields, wrong types and out-of-range values are a ConfigError naming `where` and the field."""
        try:
            if not isinstance(d, dict):
                raise ConfigError(f"must be a JSON object, got {type(d).__name__}")
            d = dict(d)
            for name in ("model", "data", "optim"):
                if name not in d:
                    raise ConfigError(f"the section {name!r} is missing")
            sections = {}
            for name, section_cls in cls.SECTIONS.items():
                value = d.pop(name, {})
                if name == "model":
                    sections[name] = model_config_from_dict(value, "model")
                    continue
                if not isinstance(value, dict):
                    raise ConfigError(f"the section {name!r} must be a JSON object, got {type(value).__name__}")
                unknown_keys(value, [f.name for f in fields(section_cls)], name)
                sections[name] = section_cls(**value)
            unknown_keys(d, [f.name for f in fields(cls) if f.name not in cls.SECTIONS], "top level")
            return cls(**sections, **d)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None


def flag_of(dotted: str) -> str | None:
    """The `cmvae-engine train` flag that sets a config field (`model.n_clusters` -> `--clusters`), or None."""
    section, _, name = dotted.rpartition(".")
    holder = TrainConfig.SECTIONS.get(section, TrainConfig) if section else TrainConfig
    if section == "fast":
        return f"--fast-set {name}=..." if name not in {e.replace("-", "_") for e in FAST_ELEMENTS} else \
            "--fast-enable/--fast-disable"
    return getattr(holder, "FLAGS", {}).get(name)

