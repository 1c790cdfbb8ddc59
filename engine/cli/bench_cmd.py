"""`cmvae-engine bench ...`: benchmarks. Each benchmark registers one command on `bench_app`."""

from __future__ import annotations

import typer

from cmvae_engine.engine.cli.bench_convergence import bench_convergence_command
from cmvae_engine.engine.cli.bench_diffusion import bench_diffusion_command
from cmvae_engine.engine.cli.bench_kernels import bench_kernels_command
from cmvae_engine.engine.cli.bench_train import bench_train_command

bench_app = typer.Typer(help="Benchmarks: kernels, training step, convergence. Results go to bench/results/.",
                        no_args_is_help=True)
bench_app.command("kernels")(bench_kernels_command)
bench_app.command("convergence")(bench_convergence_command)
bench_app.command("train", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(
    bench_train_command)
bench_app.command("diffusion")(bench_diffusion_command)
