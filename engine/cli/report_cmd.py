"""`cmvae-engine report RUN_DIR`: one self-contained HTML page of a run."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.text import Text


def report_command(
    run_dir: Annotated[Path, typer.Argument(help="Run folder of `cmvae-engine train`.")],
    out: Annotated[Path | None, typer.Option(help="HTML file to write (default RUN_DIR/report.html).")] = None,
) -> None:
    """Write an HTML report (config, training curves, metrics, cluster selection, samples; images inlined)."""
    from cmvae_engine.engine.progress import Board
    from cmvae_engine.engine.report import write_report

    try:
        with Board(Console()) as board, board.phase("report: plots and image grids", done_line=False):
            path = write_report(run_dir, out)
    except (ValueError, FileNotFoundError) as e:
        Console(stderr=True).print(Text(f"error: {e}", style="red"))
        raise typer.Exit(2) from None
    Console().print(f"wrote {path}", markup=False)
