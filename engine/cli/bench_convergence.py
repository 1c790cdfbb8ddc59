"""`cmvae-engine bench convergence [DATASET]`: valid and test NMI against training time and steps, per recipe and
seed."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console

from cmvae_engine.cmvae.data.errors import DataError

Opt = typer.Option


def _ints(text: str, flag: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{flag} takes comma-separated integers, e.g. 0,1,2; got {text!r}") from None


def bench_convergence_command(
    dataset: Annotated[str, typer.Argument(help="`polydigits` (built in), `polymnist`, or a data folder.")]
    = "polydigits",
    recipes: Annotated[str, Opt(help="Comma-separated recipes to compare.")] = "paper,fast",
    seeds: Annotated[str, Opt(help="Comma-separated seeds; every recipe runs every seed, one after another.")]
    = "0,1,2",
    budget_minutes: Annotated[float, Opt(help="Training wall time per run (evaluation excluded).")] = 15.0,
    eval_every_steps: Annotated[int, Opt(help="Steps between evaluations.")] = 50,
    prune_every: Annotated[int, Opt(help="Prune at every n-th evaluation (0: only at the end).")] = 1,
    max_steps: Annotated[int | None, Opt(help="Stop a run at this step even with budget left.")] = None,
    stop_at_k: Annotated[int | None, Opt(help="Stop a run once pruning chooses exactly this many clusters (the "
                                              "time to clusters; needs --prune-every 1).")] = None,
    width: Annotated[float, Opt(help="Network width multiplier; < 1 is a reduced model.")] = 0.25,
    clusters: Annotated[int, Opt("--clusters", "-k", help="Mixture components K (pruning starts from all).")] = 40,
    batch_size: Annotated[int, Opt(help="Tuples per step.")] = 128,
    lr: Annotated[float, Opt(help="Adam learning rate.")] = 1e-3,
    beta: Annotated[float, Opt(help="Weight of the latent terms.")] = 2.5,
    fast_disable: Annotated[str, Opt(help="`fast` elements to switch off: contrast,init,refit,prior-lr,beta-warmup,"
                                          "lr-scale.")] = "",
    fast_enable: Annotated[str, Opt(help="`fast` elements to switch on (those off by default).")] = "",
    fast_set: Annotated[str, Opt(help="`fast` settings, key=value,... (docs/recipes.md).")] = "",
    compile: Annotated[bool, Opt(help="torch.compile the training step.")] = False,
    amp: Annotated[bool | None, Opt(help="Autocast the networks (default: on for CUDA and AMX CPUs, off on "
                                         "other CPUs).")] = None,
    diagnostics: Annotated[bool, Opt(help="Also score k-means on each scored split's posterior means (uses the "
                                          "class count).")] = False,
    score_splits: Annotated[str, Opt(help="Splits scored at every evaluation, each in its own columns (valid_nmi, "
                                          "test_nmi, ...): choose settings on valid, report test.")] = "valid,test",
    device: Annotated[str, Opt(help="auto | cpu | cuda | cuda:N.")] = "auto",
    threads: Annotated[int | None, Opt(help="CPU threads for torch.")] = None,
    data_root: Annotated[str | None, Opt(help="Folder of named data sets (default $CMVAE_DATA_DIR or ./data).")]
    = None,
    out_dir: Annotated[str, Opt(help="Where the JSON and the plot go.")] = "bench/results",
    tag: Annotated[str, Opt(help="Extra word in the file names.")] = "",
) -> None:
    """Train each (recipe, seed) for a wall-clock budget, scoring the valid and test splits in separate columns
    (and pruning from K on the validation split) at intervals; writes JSON and a plot of NMI against time and
    steps."""
    from cmvae_engine.bench.convergence import ConvergenceSettings, run_convergence
    from cmvae_engine.engine.config import FastRecipeConfig, StepConfig

    console = Console()
    try:
        settings = ConvergenceSettings(
            dataset=dataset, recipes=[r.strip() for r in recipes.split(",") if r.strip()],
            seeds=_ints(seeds, "--seeds"), budget_minutes=budget_minutes, max_steps=max_steps,
            stop_at_k=stop_at_k,
            eval_every_steps=eval_every_steps, prune_every=prune_every, width=width, clusters=clusters,
            batch_size=batch_size, lr=lr, beta=beta, device=device, threads=threads, data_root=data_root,
            fast=FastRecipeConfig.from_flags(fast_disable, fast_enable, fast_set),
            step=StepConfig(compile=compile, amp=amp), diagnostics=diagnostics, out_dir=out_dir, tag=tag,
            score_splits=[x.strip() for x in score_splits.split(",") if x.strip()],
        )
        run_convergence(settings, console)
    except (DataError, ValueError, FileNotFoundError) as e:
        console.print(f"[red]error:[/] {e}")
        raise typer.Exit(2) from None
