"""`cmvae-engine train DATASET`: reference defaults, a flag for each.

`train_flags` holds the flags and builds the TrainConfig (`config_from_flags`); `train_command` is the command with
the same flags. `cmvae-engine profile` and `bench train` parse train flags through `train_flags` too.

What the user passed is told apart from defaults by click's parameter source (command line or environment), so
`--resume` and `--config RUN/config.json` take the run's settings and override exactly the flags given, even one
given with its default value (`--clusters 40` on a K=10 run is then refused as a change of the model).
"""

from __future__ import annotations

import functools
import json
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.text import Text

from cmvae_engine.cmvae.config import ModelConfig
from cmvae_engine.engine.cli.mfcvae_flags import mfcvae_model_config, parse_clusters, parse_settings
from cmvae_engine.engine.config import (
    CheckpointConfig,
    ConfigError,
    DataConfig,
    FastRecipeConfig,
    OptimConfig,
    StepConfig,
    TrainConfig,
)
from cmvae_engine.engine.signals import EXIT_BAD_INPUT, EXIT_FAILED

Opt = typer.Option


def train_flags(
    ctx: typer.Context,
    dataset: Annotated[str | None, typer.Argument(help="`polydigits` (built in), `polymnist`, or a data folder "
                                                       "(with --resume or --config: default the run's).",
                                                  show_default=False)] = None,
    epochs: Annotated[int, Opt(help="Passes over the training split.")] = 250,
    batch_size: Annotated[int, Opt(help="Tuples per step.")] = 128,
    lr: Annotated[float, Opt(help="Adam learning rate.")] = 1e-3,
    amsgrad: Annotated[bool, Opt("--amsgrad/--no-amsgrad", help="The AMSGrad variant of Adam (the reference: on).")]
    = True,
    beta: Annotated[float, Opt(help="Weight of the latent terms.")] = 2.5,
    clusters: Annotated[str, Opt("--clusters", "-k", help="Mixture components K (mfcvae: one per facet, K1,K2; "
                                                          "one K for all).")] = "40",
    z_dim: Annotated[int, Opt(help="Shared latent size Dz.")] = 32,
    w_dim: Annotated[int, Opt(help="Private latent size Dw.")] = 32,
    family: Annotated[str, Opt(help="Latent family: laplace | normal.")] = "laplace",
    recipe: Annotated[str, Opt(help="paper (the reference procedure exactly) | fast (the same model and final "
                                    "objective; a contrastive warm start of z, then the prior fitted to the "
                                    "representation; docs/recipes.md).")] = "paper",
    fast_disable: Annotated[str, Opt(help="`fast` elements to switch off: contrast,init,refit,prior-lr,beta-warmup,"
                                          "lr-scale.")] = "",
    fast_enable: Annotated[str, Opt(help="`fast` elements to switch on (those off by default).")] = "",
    fast_set: Annotated[str, Opt(help="`fast` settings, key=value,... (docs/recipes.md).")] = "",
    objective: Annotated[str, Opt(help="iwae (reference) | dreg (correct DReG).")] = "iwae",
    samples: Annotated[int, Opt("--samples", "-S", help="Importance samples per datapoint.")] = 1,
    width: Annotated[float, Opt(help="Network width multiplier; < 1 is a reduced model.")] = 1.0,
    learn_scales: Annotated[bool, Opt(help="Learn the cluster scales.")] = False,
    model: Annotated[str, Opt(help="cmvae | mmvaeplus (K=1, fixed zero-mean prior) | mfcvae (multi-facet "
                                   "clustering, single modality).")] = "cmvae",
    facets: Annotated[int, Opt(help="mfcvae: facets J (clusterings of the data).")] = 2,
    mfcvae_set: Annotated[str, Opt(help="mfcvae settings, key=value,... (lists colon-separated, e.g. "
                                        "z_dims=5:5,solo_steps=600,fade_steps=600).")] = "",
    max_steps: Annotated[int | None, Opt(help="Stop after this many steps.")] = None,
    drop_last: Annotated[bool, Opt(help="Drop the last partial batch.")] = False,
    eval_every: Annotated[int, Opt(help="Epochs between test evaluations (0: none).")] = 1,
    log_every: Annotated[int, Opt(help="Steps between loss reads (host syncs).")] = 20,
    log: Annotated[str, Opt(help="Extra logging sinks, comma-separated: tensorboard (RUN/tensorboard/), wandb "
                                 "(RUN/wandb/; WANDB_MODE=offline works without network). metrics.jsonl and "
                                 "steps.jsonl are always written.")] = "",
    data_root: Annotated[str | None, Opt(help="Folder of named data sets (default $CMVAE_DATA_DIR or ./data).")] = None,
    device: Annotated[str, Opt(help="auto | cpu | cuda | cuda:N.")] = "auto",
    seed: Annotated[int, Opt(help="Seed of parameters, sampling and data order.")] = 0,
    threads: Annotated[int | None, Opt(help="CPU threads for torch.")] = None,
    kernels: Annotated[str, Opt(envvar="CMVAE_KERNELS", help="Fused ops: auto | torch | triton | ext.")] = "auto",
    out: Annotated[str, Opt(help="Run folder.")] = "runs/latest",
    loader: Annotated[str, Opt(help="resident (data set on the device) | files (naive baseline) | webdataset | "
                                    "dali.")] = "resident",
    workers: Annotated[int, Opt(help="Loader worker processes (files, webdataset) or DALI threads.")] = 2,
    shard_dir: Annotated[str | None, Opt(help="Shards of `cmvae-engine data shard` (default DATASET/shards).")]
    = None,
    shuffle_buffer: Annotated[int, Opt(help="Tuples per streaming worker's shuffle buffer (0: shard order).")]
    = 4096,
    amp: Annotated[bool | None, Opt("--amp/--no-amp", help="Autocast the networks (default: on for CUDA and "
                                                             "AMX CPUs, off on other CPUs).",
                    show_default=False)] = None,
    amp_dtype: Annotated[str, Opt(help="bf16 | fp16 (fp16 adds a GradScaler).")] = "bf16",
    compile: Annotated[bool, Opt("--compile/--no-compile", help="torch.compile the model and loss (drops the "
                                                                "last partial batch: static shapes).")] = False,
    cuda_graphs: Annotated[bool, Opt(help="Replay the compiled step as CUDA graphs (needs --compile).")] = False,
    channels_last: Annotated[bool | None, Opt("--channels-last/--no-channels-last", help="channels_last "
                                              "convolutions (default: on).", show_default=False)] = None,
    per_pair_decoders: Annotated[bool | None, Opt("--per-pair-decoders/--batched-decoders", help="One decoder "
                                                  "call per (source, target) pair, as the reference, or one per "
                                                  "target (default: per pair on CPU, batched on CUDA).",
                                                  show_default=False)] = None,
    batch_encoders: Annotated[bool | None, Opt("--batch-encoders/--no-batch-encoders", help="All 2M encoder "
                                               "towers as one grouped computation, same values to rounding "
                                               "(default: on for CUDA, off on CPU).", show_default=False)] = None,
    checkpoint_every: Annotated[int, Opt(help="Steps between checkpoints (0: epoch ends and stops only).")] = 0,
    keep: Annotated[int, Opt(help="ckpt-{step}.pt files kept (checkpoint.pt is always the latest).")] = 3,
    resume: Annotated[bool, Opt(help="Continue --out from its newest valid checkpoint with the run's settings; flags "
                                     "you pass override those that may change (a changed model, objective, seed, "
                                     "optimiser or data set is refused).")] = False,
    overwrite: Annotated[bool, Opt(help="Replace the run already in --out (its checkpoints, metrics and outputs, "
                                        "removed once the new run's data and settings are checked).")] = False,
    config: Annotated[str | None, Opt(help="Start from the settings of a saved run (RUN/config.json); flags you "
                                           "pass override them.", show_default=False)] = None,
    nproc: Annotated[int, Opt(help="Data-parallel processes (one per GPU; gloo on CPU); --batch-size stays "
                                   "the global batch.")] = 1,
) -> TrainConfig:
    """Train a CMVAE (or MMVAE+) with the reference defaults of the paper's PolyMNIST run."""
    flags = {k: v for k, v in locals().items() if k != "ctx"}
    flags["clusters"] = parse_clusters(flags["clusters"])  # K, or one K per facet (mfcvae)
    return config_from_flags(flags, explicit_flags(ctx, flags))


def _build(f: dict, fast_base: FastRecipeConfig | None = None) -> TrainConfig:
    """The TrainConfig the flags describe on their own (every value checked)."""
    return TrainConfig(
        model=mfcvae_model_config(f) if f["model"] == "mfcvae" else
        ModelConfig(kind=f["model"], n_clusters=f["clusters"], z_dim=f["z_dim"], w_dim=f["w_dim"],
                    family=f["family"], width=f["width"], learn_scales=f["learn_scales"]),
        data=DataConfig(dataset=f["dataset"], data_root=f["data_root"], drop_last=f["drop_last"], loader=f["loader"],
                        workers=f["workers"], shard_dir=f["shard_dir"], shuffle_buffer=f["shuffle_buffer"]),
        optim=OptimConfig(lr=f["lr"], amsgrad=f["amsgrad"], batch_size=f["batch_size"], epochs=f["epochs"],
                          max_steps=f["max_steps"]),
        step=StepConfig(amp=f["amp"], amp_dtype=f["amp_dtype"], compile=f["compile"], cuda_graphs=f["cuda_graphs"],
                        channels_last=f["channels_last"], decode_per_pair=f["per_pair_decoders"],
                        batch_encoders=f["batch_encoders"]),
        ckpt=CheckpointConfig(every=f["checkpoint_every"], keep=f["keep"]),
        recipe=f["recipe"], fast=FastRecipeConfig.from_flags(f["fast_disable"], f["fast_enable"], f["fast_set"],
                                                             fast_base),
        objective=f["objective"], n_samples=f["samples"], beta=f["beta"], seed=f["seed"], device=f["device"],
        out=f["out"], log_every=f["log_every"], log=f["log"], eval_every=f["eval_every"], threads=f["threads"],
        kernels=f["kernels"], resume=f["resume"], overwrite=f["overwrite"], nproc=f["nproc"],
    )


_FAST_FLAGS = ("fast_disable", "fast_enable", "fast_set")


def _option(flag: str) -> str:
    """`--amsgrad/--no-amsgrad` -> `amsgrad`, `DATASET` -> `dataset`: the parameter name of a config field's flag."""
    return flag.split("/")[0].lstrip("-").replace("-", "_").lower()


def option_fields() -> dict[str, str]:
    """Each train option -> the config field it sets (dotted), from the FLAGS tables of the config classes."""
    fields = {_option(flag): name for name, flag in TrainConfig.FLAGS.items()}
    for section, cls in TrainConfig.SECTIONS.items():
        fields.update({_option(flag): f"{section}.{name}" for name, flag in getattr(cls, "FLAGS", {}).items()})
    fields.update({f: "fast" for f in _FAST_FLAGS})
    fields["facets"] = "model.n_facets"
    fields["mfcvae_set"] = "model"  # several model fields at once (engine/cli/mfcvae_flags.py)
    return fields


def explicit_flags(ctx: typer.Context | None, flags: dict) -> set[str]:
    """The options the user passed (command line or environment variable), whatever their value."""
    if ctx is None:
        return set(flags)
    given = set()
    for name in flags:
        source = ctx.get_parameter_source(name)
        if source is not None and source.name in ("COMMANDLINE", "ENVIRONMENT"):
            given.add(name)
    return given


def _set(tree: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for p in parents:
        tree = tree.setdefault(p, {})
    tree[leaf] = value


def read_config_file(path: str) -> dict:
    """The TrainConfig dict of a run's config.json (`{"config": {...}, ...}`) or of a bare config dict."""
    file = Path(path)
    if file.is_dir():
        file = file / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"--config {path}: no such file. Fix: pass a run's config.json (RUN/config.json, "
                                "written by `cmvae-engine train`)")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"--config {file}: not valid JSON ({e}). Fix: pass a run's config.json, or repair this "
                          "file") from None
    if isinstance(data, dict) and isinstance(data.get("config"), dict):
        data = data["config"]
    if not isinstance(data, dict):
        raise ConfigError(f"--config {file}: holds a JSON {type(data).__name__}, not a run's settings. Fix: pass a "
                          "run's config.json")
    return data


def _saved_run_config(out: str) -> dict:
    from cmvae_engine.engine.resume import check_out_folder, find_latest

    check_out_folder(Path(out), resume=True, overwrite=False)
    return find_latest(Path(out)).payload["config"]


def config_from_flags(flags: dict, explicit: set[str]) -> TrainConfig:
    """The run's config: the flags alone, or (with --resume / --config) the saved settings of a run with the
    explicitly passed flags on top. A changed fixed setting under --resume is refused later, by the trainer,
    against the checkpoint it resumes from."""
    if flags["resume"] and flags["config"]:
        raise ConfigError("--config and --resume both give the run's settings. Fix: pass --resume alone to continue "
                          "the run in --out, or --config alone to start a new run from saved settings")
    if not flags["resume"] and not flags["config"]:
        if flags["dataset"] is None:
            raise ConfigError("missing DATASET. Fix: pass `polydigits`, `polymnist` or a data folder (or --config "
                              "RUN/config.json to re-run a saved run, --resume to continue one)")
        return _build(flags)
    source = f"--config {flags['config']}" if flags["config"] else f"the checkpoint in --out {flags['out']}"
    base = read_config_file(flags["config"]) if flags["config"] else _saved_run_config(flags["out"])
    try:
        saved = TrainConfig.from_dict(base, where=source)
    except ConfigError as e:
        raise ConfigError(f"{e} (or correct that field in the file)") from None
    merged = saved.to_dict()
    merged.update(resume=flags["resume"], overwrite=flags["overwrite"])
    if flags["resume"]:
        merged["out"] = flags["out"]
    # The passed values as they are: cross-field checks (e.g. --nproc against the batch size) then see the run's
    # own values, not the flags' defaults.
    fields = option_fields()
    for name in sorted(explicit - set(_FAST_FLAGS) - {"mfcvae_set"}):
        if name in fields:
            _set(merged, fields[name], flags[name])
    if "mfcvae_set" in explicit:
        merged["model"].update(parse_settings(flags["mfcvae_set"]))
    if explicit & set(_FAST_FLAGS):
        merged["fast"] = asdict(FastRecipeConfig.from_flags(flags["fast_disable"], flags["fast_enable"],
                                                            flags["fast_set"], base=saved.fast))
    return TrainConfig.from_dict(merged, where="your flags on the saved settings")


@functools.wraps(train_flags)
def train_command(**options) -> None:
    from cmvae_engine.engine.signals import Stopped
    from cmvae_engine.engine.trainer import train  # heavy imports only when the command runs

    console = Console()
    errors = Console(stderr=True, soft_wrap=True)
    try:
        cfg = train_flags(**options)
        train(cfg, console)
    except Stopped as e:  # the loop has said where the checkpoint is
        raise typer.Exit(e.exit_code) from None
    except KeyboardInterrupt:
        errors.print(Text(f"interrupted at once (a second Ctrl-C): the newest checkpoint in {options['out']} is kept; "
                          "continue with the same command and --resume", style="red"))
        raise typer.Exit(130) from None
    except (ValueError, FileNotFoundError) as e:  # refused before training: bad input (DataError is a ValueError)
        errors.print(Text(f"error: {e}", style="red"))
        raise typer.Exit(EXIT_BAD_INPUT) from None
    except (FloatingPointError, RuntimeError) as e:  # training failed (non-finite loss, full disk, a worker)
        errors.print(Text(f"error: {e}", style="red"))
        raise typer.Exit(EXIT_FAILED) from None

