"""The `cmvae-engine` command: one typer app, one module per command group."""

from __future__ import annotations

import typer

from cmvae_engine.engine.cli.bench_cmd import bench_app
from cmvae_engine.engine.cli.classifiers_cmd import classifiers_app
from cmvae_engine.engine.cli.data_cmd import data_app
from cmvae_engine.engine.cli.diffusion_cmd import train_diffusion_command
from cmvae_engine.engine.cli.eval_cmd import eval_command
from cmvae_engine.engine.cli.generate_cmd import generate_command
from cmvae_engine.engine.cli.profile_cmd import PROFILE_CONTEXT, profile_command
from cmvae_engine.engine.cli.prune_cmd import prune_command
from cmvae_engine.engine.cli.report_cmd import report_command
from cmvae_engine.engine.cli.train_cmd import train_command

app = typer.Typer(
    name="cmvae-engine",
    help="Train, prune, evaluate and benchmark clustering multimodal VAEs.",
    rich_markup_mode="rich",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
app.command("train")(train_command)
app.add_typer(data_app, name="data")
app.add_typer(bench_app, name="bench")
app.command("eval")(eval_command)
app.add_typer(classifiers_app, name="classifiers")
app.command("prune")(prune_command)
app.command("generate")(generate_command)
app.command("report")(report_command)
app.command("profile", context_settings=PROFILE_CONTEXT)(profile_command)
app.command("train-diffusion")(train_diffusion_command)


def main() -> None:
    app()
