"""`cmvae-engine profile DATASET [train flags] --steps N --warmup W --out DIR`."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console

from cmvae_engine.cmvae.checks import COUNT, Rule, check_flags
from cmvae_engine.cmvae.data.errors import DataError
from cmvae_engine.engine.config import TrainConfig


def parse_train_flags(dataset: str, args: list[str], command: str) -> TrainConfig:
    """A TrainConfig from `cmvae-engine train` flags (the same parser, so every train flag works here)."""
    from cmvae_engine.engine.cli.train_cmd import train_flags

    app = typer.Typer()
    app.command()(train_flags)
    cmd = typer.main.get_command(app)
    try:
        ctx = cmd.make_context(command, [dataset, *args])
    except Exception as e:  # click's UsageError (vendored inside typer): a bad or unknown flag
        if not hasattr(e, "format_message"):
            raise
        raise ValueError(f"{e.format_message()} (train flags: see `cmvae-engine train --help`)") from None
    with ctx:
        return cmd.invoke(ctx)


def profile_command(
    ctx: typer.Context,
    dataset: Annotated[str, typer.Argument(help="`polydigits`, `polymnist` or a data folder.")],
    steps: Annotated[int, typer.Option(help="Profiled steps.")] = 10,
    warmup: Annotated[int, typer.Option(help="Warm-up steps before profiling (compilation, cuDNN autotuning).")] = 5,
    out: Annotated[str, typer.Option(help="Folder for trace.json, report.md and phases.png.")] = "runs/profile",
) -> None:
    """Profile training steps: Chrome trace and a report (phases, top ops, syncs, memory, TFLOP/s).

    Any `cmvae-engine train` flag may follow (e.g. --width 0.25 --compile --amp --batch-size 128).
    """
    from cmvae_engine.engine.profiling import profile_training

    console = Console()
    try:
        check_flags(("--steps", steps, COUNT, 10), ("--warmup", warmup, Rule(int, low=0), 5))
        cfg = parse_train_flags(dataset, list(ctx.args), "cmvae-engine profile")
        profile_training(cfg, steps=steps, warmup=warmup, out=out, console=console)
    except (DataError, ValueError, FileNotFoundError) as e:
        console.print(f"[red]error:[/] {e}")
        raise typer.Exit(2) from None


PROFILE_CONTEXT = {"allow_extra_args": True, "ignore_unknown_options": True}
