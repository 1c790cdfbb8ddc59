"""`cmvae-engine bench train [DATASET] [train flags]`: training-step throughput, everything on vs everything off."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from cmvae_engine.cmvae.checks import COUNT, Rule, check_flags
from cmvae_engine.cmvae.data.errors import DataError


def bench_train_command(
    ctx: typer.Context,
    dataset: Annotated[str, typer.Argument(help="`polydigits` (default), `polymnist` or a data folder.")]
    = "polydigits",
    steps: Annotated[int, typer.Option(help="Timed steps per variant.")] = 20,
    warmup: Annotated[int, typer.Option(help="Untimed steps first (compilation, autotuning, loader start).")] = 5,
    out: Annotated[str, typer.Option(help="Folder of the JSON result.")] = "bench/results",
    reference_code: Annotated[str | None, typer.Option(
        help="The authors' CMVAE repository (a checkout): time their released training step beside ours (our "
             "default step with the train flags given), interleaved, each in its own process (peak RSS), on random "
             "images at full width; --steps/--warmup are per side.", show_default=False)] = None,
    shape: Annotated[str | None, typer.Option(
        help="`cubicc`: time the CUBICC-shaped step (64x64 images + 32-token captions over 1590 words, random "
             "content written to DATA_ROOT/cubicc-shaped) with the reference's CUBICC settings (Normal, Dz 64, Dw 32, "
             "K 35, beta 1, DReG S=10, batch 32) unless train flags say otherwise.")] = None,
) -> None:
    """Samples/s, steps/s, TFLOP/s and peak memory of the optimised engine against the baseline (eager fp32,
    per-pair decoders, plain-torch ops, `files` loader), same config, one run. Train flags may follow
    (e.g. --width 0.25 --batch-size 128)."""
    from cmvae_engine.bench.train import bench_train
    from cmvae_engine.engine.cli.profile_cmd import parse_train_flags

    console = Console()
    try:
        check_flags(("--steps", steps, COUNT, 20), ("--warmup", warmup, Rule(int, low=0), 5))
        args = list(ctx.args)
        if shape is not None:
            dataset, args = _shaped(shape, args)
        cfg = parse_train_flags(dataset, args, "cmvae-engine bench train")
        if reference_code is not None:
            _reference(console, cfg, reference_code, steps, warmup, out)
            return
        path, rows = bench_train(cfg, steps=steps, warmup=warmup, out_dir=out)
    except (DataError, ValueError, FileNotFoundError) as e:
        console.print(f"[red]error:[/] {e}")
        raise typer.Exit(2) from None
    table = Table(title=f"bench train on {rows[0]['device']}, width {cfg.model.width:g}, batch {cfg.optim.batch_size}")
    for col in ("variant", "samples/s", "steps/s", "TFLOP/s", "peak MB", "paper run (min)", "options"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["variant"], f"{r['samples_per_s']:,.1f}", f"{r['steps_per_s']:.3g}", f"{r['tflops']:.3g}",
                      f"{r['peak_mem_mb']:,.0f}", f"{r['projected_paper_run_minutes']:,.0f}", r["options"])
    console.print(table)
    speed = rows[-1].get("speedup_vs_baseline")
    if speed:
        console.print(f"optimised / baseline: {speed:.2f}x samples/s -> {path}")


def _reference(console: Console, cfg, reference_code: str, steps: int, warmup: int, out: str) -> None:
    from cmvae_engine.bench.reference import compare_reference

    path, r = compare_reference(cfg, reference_code, steps=steps, warmup=warmup, out_dir=out)
    table = Table(title=f"bench train vs the authors' code on {r['device']} ({r['threads']} threads), batch "
                        f"{r['config']['batch_size']}, {r['config']['objective']} S={r['config']['n_samples']}")
    for col in ("code", "ms/step (median)", "GFLOP/s", "of matmul peak", "peak RSS MB", "options"):
        table.add_column(col)
    for side in ("ours", "reference"):
        row = r[side]
        table.add_row(side, f"{row['step_ms_median']:,.0f}", f"{row['gflops']:.1f}",
                      f"{row['fraction_of_matmul_peak']:.0%}", f"{row['peak_rss_mb']:,.0f}", row["options"])
    console.print(table)
    console.print(f"ours is {r['speedup_vs_reference']:.2f}x the authors' speed; fp32 matmul peak "
                  f"{r['matmul_peak_gflops']:.0f} GFLOP/s; load average {r['load_average_before'][0]:.1f} -> "
                  f"{r['load_average_after'][0]:.1f} -> {path}")


CUBICC_FLAGS = ["--family", "normal", "--z-dim", "64", "--w-dim", "32", "--clusters", "35", "--beta", "1",
                "--objective", "dreg", "--samples", "10", "--batch-size", "32", "--width", "1.0"]
"""The reference's CUBICC settings (src/train_CMVAE_CUBICC.py and its run script)."""


def _shaped(shape: str, args: list[str]) -> tuple[str, list[str]]:
    """The data folder and train flags of a --shape: the shape's settings first, so flags given after override."""
    if shape != "cubicc":
        raise ValueError(f"--shape {shape!r}: the known shape is cubicc")
    from cmvae_engine.cmvae.data.cubicc import synth_cubicc_shaped
    from cmvae_engine.cmvae.data.format import read_manifest
    from cmvae_engine.cmvae.data.resolve import default_data_root

    folder = default_data_root() / "cubicc-shaped"
    if (read_manifest(folder) if (folder / "manifest.json").is_file() else None) is None:
        synth_cubicc_shaped(folder)
    return str(folder), [*CUBICC_FLAGS, *args]
