"""`cmvae-engine train DATASET`: reference defaults, a flag for each.

`train_config` holds the flags (and builds the TrainConfig); `train_command` is the command with the same flags.
`cmvae-engine profile` and `bench train` parse train flags through `train_config` too.
"""

from __future__ import annotations

import functools
import inspect
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from cmvae_engine.cmvae.config import ModelConfig
from cmvae_engine.cmvae.data.errors import DataError
from cmvae_engine.engine.config import (
    CheckpointConfig,
    DataConfig,
    FastRecipeConfig,
    OptimConfig,
    StepConfig,
    TrainConfig,
)

Opt = typer.Option


def train_config(
    dataset: Annotated[str, typer.Argument(help="`polydigits` (built in), `polymnist`, or a data folder.")],
    epochs: Annotated[int, Opt(help="Passes over the training split.")] = 250,
    batch_size: Annotated[int, Opt(help="Tuples per step.")] = 128,
    lr: Annotated[float, Opt(help="Adam learning rate.")] = 1e-3,
    beta: Annotated[float, Opt(help="Weight of the latent terms.")] = 2.5,
    clusters: Annotated[int, Opt("--clusters", "-k", help="Mixture components K.")] = 40,
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
    model: Annotated[str, Opt(help="cmvae | mmvaeplus (K=1, fixed zero-mean prior).")] = "cmvae",
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
    amp: Annotated[bool | None, Opt("--amp/--no-amp", help="Autocast the networks (default: on for CUDA, off on "
                                                             "CPU).", show_default=False)] = None,
    amp_dtype: Annotated[str, Opt(help="bf16 | fp16 (fp16 adds a GradScaler).")] = "bf16",
    compile: Annotated[bool, Opt("--compile/--no-compile", help="torch.compile the model and loss (drops the "
                                                                "last partial batch: static shapes).")] = False,
    cuda_graphs: Annotated[bool, Opt(help="Replay the compiled step as CUDA graphs (needs --compile).")] = False,
    channels_last: Annotated[bool | None, Opt("--channels-last/--no-channels-last", help="channels_last "
                                              "convolutions (default: on for CUDA).", show_default=False)] = None,
    per_pair_decoders: Annotated[bool, Opt(help="One decoder call per (source, target) pair, as the reference.")]
    = False,
    checkpoint_every: Annotated[int, Opt(help="Steps between checkpoints (0: epoch ends and stops only).")] = 0,
    keep: Annotated[int, Opt(help="ckpt-{step}.pt files kept (checkpoint.pt is always the latest).")] = 3,
    resume: Annotated[bool, Opt(help="Continue --out from its latest checkpoint; flags you pass override "
                                     "the run's saved settings where they may change.")] = False,
    nproc: Annotated[int, Opt(help="Data-parallel processes (one per GPU; gloo on CPU); --batch-size stays "
                                   "the global batch.")] = 1,
) -> TrainConfig:
    """Train a CMVAE (or MMVAE+) with the reference defaults of the paper's PolyMNIST run."""
    return TrainConfig(
        model=ModelConfig(kind=model, n_clusters=clusters, z_dim=z_dim, w_dim=w_dim, family=family,
                          width=width, learn_scales=learn_scales),
        data=DataConfig(dataset=dataset, data_root=data_root, drop_last=drop_last, loader=loader, workers=workers,
                        shard_dir=shard_dir, shuffle_buffer=shuffle_buffer),
        optim=OptimConfig(lr=lr, batch_size=batch_size, epochs=epochs, max_steps=max_steps),
        step=StepConfig(amp=amp, amp_dtype=amp_dtype, compile=compile, cuda_graphs=cuda_graphs,
                        channels_last=channels_last, decode_per_pair=per_pair_decoders),
        ckpt=CheckpointConfig(every=checkpoint_every, keep=keep),
        recipe=recipe, fast=FastRecipeConfig.from_flags(fast_disable, fast_enable, fast_set),
        objective=objective, n_samples=samples, beta=beta, seed=seed, device=device, out=out,
        log_every=log_every, log=log, eval_every=eval_every, threads=threads, kernels=kernels, resume=resume,
        nproc=nproc,
    )


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _unflat(flat: dict) -> dict:
    out: dict = {}
    for key, v in flat.items():
        *parents, leaf = key.split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return out


def resume_config(cfg: TrainConfig, defaults: TrainConfig) -> TrainConfig:
    """The saved config of the run in cfg.out, overridden by every setting of cfg that differs from defaults."""
    from cmvae_engine.engine.checkpoint import load_checkpoint
    from cmvae_engine.engine.resume import LATEST

    path = Path(cfg.out) / LATEST
    if not path.is_file():
        raise FileNotFoundError(f"--resume: no checkpoint at {path}; train into --out {cfg.out} first, or drop "
                                "--resume")
    saved = _flat(load_checkpoint(path)["config"])
    new, base = _flat(cfg.to_dict()), _flat(defaults.to_dict())
    saved.update({k: v for k, v in new.items() if k not in saved or v != base.get(k)})
    saved.update(resume=True, out=cfg.out)
    return TrainConfig.from_dict(_unflat(saved))


@functools.wraps(train_config)
def train_command(**options) -> None:
    from cmvae_engine.engine.trainer import train  # heavy imports only when the command runs

    console = Console()
    try:
        cfg = train_config(**options)
        if cfg.resume:
            defaults = {p.name: p.default for p in inspect.signature(train_config).parameters.values()
                        if p.name != "dataset"}
            cfg = resume_config(cfg, train_config(dataset=options["dataset"], **defaults))
        train(cfg, console)
    except (DataError, ValueError, FileNotFoundError, FloatingPointError, RuntimeError) as e:
        console.print(f"[red]error:[/] {e}")
        raise typer.Exit(2) from None
