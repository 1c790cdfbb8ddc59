"""`cmvae-engine generate RUN_DIR`: per-cluster and cross-modal sample grids as PNG files."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.text import Text

from cmvae_engine.cmvae.checks import COUNT, SEED, Rule, check_flags
from cmvae_engine.cmvae.diffusion.config import DEFAULT_STRENGTH, STRENGTH_RULE

Opt = typer.Option


def generate_command(
    run_dir: Annotated[Path, typer.Argument(help="Run folder (uses pruned.pt when present, else checkpoint.pt).")],
    n: Annotated[int, Opt("--n", help="Samples per cluster and modality (and test inputs per conditional grid).")] = 8,
    cluster: Annotated[int | None, Opt(help="Only this cluster: rows modalities, columns samples.")] = None,
    out: Annotated[Path | None, Opt(help="Output folder (default RUN_DIR/generated).")] = None,
    seed: Annotated[int, Opt(help="Seed of the samples.")] = 0,
    device: Annotated[str, Opt(help="auto | cpu | cuda | cuda:N.")] = "auto",
    data_root: Annotated[Path | None, Opt(help="Folder of named data sets (default: the run's).")] = None,
    diffusion: Annotated[bool, Opt("--diffusion", help="D-CMVAE grids (the diffusion stage of `train-diffusion`) "
                                                       "beside the CMVAE's samples.")] = False,
    diffusion_dir: Annotated[Path | None, Opt(help="The diffusion run (default RUN_DIR/diffusion).")] = None,
    sampler: Annotated[str, Opt(help="With --diffusion: ddim | ddpm (all T steps).")] = "ddim",
    steps: Annotated[int, Opt(help="With --diffusion: DDIM steps.")] = 50,
    eta: Annotated[float, Opt(help="With --diffusion: DDIM eta (0 deterministic, 1 DDPM's variance).")] = 0.0,
    strength: Annotated[float, Opt(help="With --diffusion: how far into the forward process sampling starts: 1 from "
                                        "pure noise; less from the CMVAE sample noised to that fraction of the "
                                        "steps.")] = DEFAULT_STRENGTH,
) -> None:
    """Sample grids: unconditional per cluster (rows clusters, columns modalities) and conditional per source
    modality (inputs, then every modality generated from them)."""
    from cmvae_engine.engine.generate_run import generate_run

    console = Console()
    try:
        check_flags(("--n", n, COUNT, 8), ("--cluster", cluster, Rule(int, low=0, optional=True), 0),
                    ("--seed", seed, SEED, 0))
        if diffusion:
            from cmvae_engine.engine.generate_diffusion import generate_diffusion

            check_flags(("--steps", steps, COUNT, 50), ("--eta", eta, Rule(float, low=0, high=1), 0.0),
                        ("--strength", strength, STRENGTH_RULE, DEFAULT_STRENGTH))
            generate_diffusion(run_dir, diffusion_dir=diffusion_dir, n=n, sampler=sampler, steps=steps, eta=eta,
                               strength=strength,
                               seed=seed, device=device, out=out, data_root=data_root, console=console)
            return
        generate_run(run_dir, n=n, cluster=cluster, out=out, seed=seed, device=device, data_root=data_root,
                     console=console)
    except (ValueError, FileNotFoundError) as e:
        Console(stderr=True).print(Text(f"error: {e}", style="red"))
        raise typer.Exit(2) from None
