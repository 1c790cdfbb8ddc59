"""`cmvae-engine train DATASET`: reference defaults, a flag for each."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console

from cmvae.config import ModelConfig
from cmvae.data.errors import DataError
from engine.config import DataConfig, OptimConfig, TrainConfig

Opt = typer.Option


def train_command(
    dataset: Annotated[str, typer.Argument(help="`polydigits` (built in), `polymnist`, or a data folder.")],
    epochs: Annotated[int, Opt(help="Passes over the training split.")] = 250,
    batch_size: Annotated[int, Opt(help="Tuples per step.")] = 128,
    lr: Annotated[float, Opt(help="Adam learning rate.")] = 1e-3,
    beta: Annotated[float, Opt(help="Weight of the latent terms.")] = 2.5,
    clusters: Annotated[int, Opt("--clusters", "-k", help="Mixture components K.")] = 40,
    z_dim: Annotated[int, Opt(help="Shared latent size Dz.")] = 32,
    w_dim: Annotated[int, Opt(help="Private latent size Dw.")] = 32,
    family: Annotated[str, Opt(help="Latent family: laplace | normal.")] = "laplace",
    recipe: Annotated[str, Opt(help="paper (the reference procedure exactly).")] = "paper",
    objective: Annotated[str, Opt(help="iwae (reference) | dreg (correct DReG).")] = "iwae",
    samples: Annotated[int, Opt("--samples", "-S", help="Importance samples per datapoint.")] = 1,
    width: Annotated[float, Opt(help="Network width multiplier; < 1 is a reduced model.")] = 1.0,
    learn_scales: Annotated[bool, Opt(help="Learn the cluster scales.")] = False,
    model: Annotated[str, Opt(help="cmvae | mmvaeplus (K=1, fixed zero-mean prior).")] = "cmvae",
    max_steps: Annotated[int | None, Opt(help="Stop after this many steps.")] = None,
    drop_last: Annotated[bool, Opt(help="Drop the last partial batch.")] = False,
    eval_every: Annotated[int, Opt(help="Epochs between test evaluations (0: none).")] = 1,
    log_every: Annotated[int, Opt(help="Steps between loss reads (host syncs).")] = 20,
    data_root: Annotated[str | None, Opt(help="Folder of named data sets (default $CMVAE_DATA_DIR or ./data).")] = None,
    device: Annotated[str, Opt(help="auto | cpu | cuda | cuda:N.")] = "auto",
    seed: Annotated[int, Opt(help="Seed of parameters, sampling and data order.")] = 0,
    threads: Annotated[int | None, Opt(help="CPU threads for torch.")] = None,
    out: Annotated[str, Opt(help="Run folder.")] = "runs/latest",
) -> None:
    """Train a CMVAE (or MMVAE+) with the reference defaults of the paper's PolyMNIST run."""
    from engine.trainer import train  # heavy imports only when the command runs

    console = Console()
    try:
        cfg = TrainConfig(
            model=ModelConfig(kind=model, n_clusters=clusters, z_dim=z_dim, w_dim=w_dim, family=family,
                              width=width, learn_scales=learn_scales),
            data=DataConfig(dataset=dataset, data_root=data_root, drop_last=drop_last),
            optim=OptimConfig(lr=lr, batch_size=batch_size, epochs=epochs, max_steps=max_steps),
            recipe=recipe, objective=objective, n_samples=samples, beta=beta, seed=seed, device=device, out=out,
            log_every=log_every, eval_every=eval_every, threads=threads,
        )
        train(cfg, console)
    except (DataError, ValueError, FileNotFoundError, FloatingPointError) as e:
        console.print(f"[red]error:[/] {e}")
        raise typer.Exit(2) from None
