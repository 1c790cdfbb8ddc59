"""`cmvae-engine bench diffusion`: D-CMVAE denoiser training steps/s and sampled images/s (DDIM, DDPM)."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console

from cmvae_engine.cmvae.checks import COUNT, Rule, check_flags

Opt = typer.Option


def bench_diffusion_command(
    base: Annotated[int, Opt(help="UNet base channels (the paper: 64).")] = 64,
    n_res: Annotated[int, Opt(help="Residual blocks per level.")] = 2,
    modalities: Annotated[int, Opt(help="M: denoisers per train step.")] = 5,
    width: Annotated[float, Opt(help="Width of the (random-weight) CMVAE that makes x_hat.")] = 1.0,
    batch_size: Annotated[int, Opt(help="Tuples per train step.")] = 64,
    train_steps: Annotated[int, Opt(help="Timed train steps.")] = 10,
    sample_batch: Annotated[int, Opt(help="Images per sampling batch.")] = 64,
    ddim_steps: Annotated[int, Opt(help="DDIM steps.")] = 50,
    ddpm_probe: Annotated[int, Opt(help="Timed DDPM steps (the T-step rate is projected).")] = 20,
    warmup: Annotated[int, Opt(help="Untimed train steps first.")] = 2,
    amp: Annotated[bool | None, Opt("--amp/--no-amp", help="bf16 autocast (default: on for CUDA and AMX CPUs).",
                                    show_default=False)] = None,
    compile: Annotated[bool, Opt("--compile/--no-compile", help="torch.compile the train step.")] = False,
    device: Annotated[str, Opt(help="auto | cpu | cuda | cuda:N.")] = "auto",
    out: Annotated[str, Opt(help="Folder of the JSON result.")] = "bench/results",
) -> None:
    """Train steps/s and sampled images/s of the diffusion stage; JSON under bench/results/."""
    from cmvae_engine.bench.diffusion import bench_diffusion

    console = Console()
    try:
        check_flags(*((f"--{k.replace('_', '-')}", v, COUNT, 1) for k, v in
                      dict(base=base, n_res=n_res, modalities=modalities, batch_size=batch_size,
                           train_steps=train_steps, sample_batch=sample_batch, ddim_steps=ddim_steps,
                           ddpm_probe=ddpm_probe).items()), ("--warmup", warmup, Rule(int, low=0), 2))
        path, r = bench_diffusion(base=base, n_res=n_res, modalities=modalities, width=width, batch_size=batch_size,
                                  train_steps=train_steps, sample_batch=sample_batch, ddim_steps=ddim_steps,
                                  ddpm_probe=ddpm_probe, warmup=warmup, amp=amp, compile=compile, device=device,
                                  out_dir=out)
    except (ValueError, FileNotFoundError) as e:
        console.print(f"[red]error:[/] {e}")
        raise typer.Exit(2) from None
    console.print(f"bench diffusion on {r['device']} (base {base}; {r['settings']['step']}; load {r['load_average']}):"
                  f" {r['train_steps_per_s']:.3g} train steps/s ({r['train_tuples_per_s']:.1f} tuples/s), DDIM "
                  f"{ddim_steps} steps {r['ddim_images_per_s']:.3g} images/s, DDPM {r['ddpm_images_per_s']:.3g} "
                  f"images/s (projected) -> {path}", markup=False, highlight=False)
