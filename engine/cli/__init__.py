"""The `cmvae-engine` command: one typer app, one module per command group."""

from __future__ import annotations

import typer

from engine.cli.data_cmd import data_app
from engine.cli.train_cmd import train_command

app = typer.Typer(
    name="cmvae-engine",
    help="Train, prune, evaluate and benchmark clustering multimodal VAEs.",
    rich_markup_mode="rich",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
app.command("train")(train_command)
app.add_typer(data_app, name="data")


def main() -> None:
    app()
