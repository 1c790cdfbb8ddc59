"""`cmvae-engine prune RUN_DIR`: post-hoc cluster selection on a trained run."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.text import Text

from cmvae_engine.cmvae.checks import COUNT, SEED, THREADS, Rule, check_flags
from cmvae_engine.cmvae.data.format import SPLITS
from cmvae_engine.cmvae.prune import ASSIGN_RULES, ENTROPY_NORMS

Opt = typer.Option


def prune_command(
    run_dir: Annotated[Path, typer.Argument(help="Run folder of `cmvae-engine train` (holds checkpoint.pt).")],
    entropy_norm: Annotated[str, Opt(help="Divide the entropy by log of the initial K (the reference) or of "
                                          "the active K: initial | active.")] = "initial",
    assign: Annotated[str, Opt(help="Cluster of a datapoint: vote (majority over modalities, PolyMNIST) | "
                                    "confidence (argmax of the modality-averaged p(c|z), the CUBICC rule).")] = "vote",
    split: Annotated[str, Opt(help="Split to select on (valid; falls back to test with a warning).")] = "valid",
    device: Annotated[str, Opt(help="auto | cpu | cuda | cuda:N.")] = "auto",
    seed: Annotated[int, Opt(help="Seed of the z draws (one per datapoint and modality).")] = 0,
    batch_size: Annotated[int, Opt(help="Tuples per encoder call.")] = 512,
    threads: Annotated[int | None, Opt(help="CPU threads for torch (a busy CPU is often faster with 1).")] = None,
    data_root: Annotated[Path | None, Opt(help="Folder of named data sets (default: the run's).")] = None,
) -> None:
    """Select the number of clusters: prune the least used cluster step by step, keep the set with the lowest
    penalised normalised entropy. Writes prune.json, prune.png and pruned.pt into RUN_DIR."""
    from cmvae_engine.engine.prune_run import prune_run  # heavy imports only when the command runs

    console = Console()
    try:
        check_flags(("--entropy-norm", entropy_norm, Rule(ENTROPY_NORMS), "initial"),
                    ("--assign", assign, Rule(ASSIGN_RULES), "vote"), ("--split", split, Rule(SPLITS), "valid"),
                    ("--seed", seed, SEED, 0), ("--batch-size", batch_size, COUNT, 512),
                    ("--threads", threads, THREADS, 1))
        prune_run(run_dir, entropy_norm=entropy_norm, assign=assign, split=split, device=device, seed=seed,
                  batch_size=batch_size, threads=threads, data_root=data_root, console=console)
    except (ValueError, FileNotFoundError) as e:  # DataError is a ValueError
        Console(stderr=True).print(Text(f"error: {e}", style="red"))
        raise typer.Exit(2) from None
