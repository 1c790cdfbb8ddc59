"""`cmvae-engine train-diffusion RUN_DIR`: D-CMVAE's diffusion stage on a trained CMVAE run, through the same
training loop as `train` (progress, checkpoints, --resume, signals, --amp, --compile, --nproc, metrics.jsonl)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.text import Text

from cmvae_engine.engine.signals import EXIT_BAD_INPUT, EXIT_FAILED

Opt = typer.Option


def train_diffusion_command(
    ctx: typer.Context,
    run_dir: Annotated[Path, typer.Argument(help="CMVAE run folder (its pruned.pt when `prune` wrote one, else "
                                                 "checkpoint.pt).")],
    base: Annotated[int, Opt(help="UNet base channels (the paper: 64; 16 is the reduced CPU denoiser).")] = 64,
    n_res: Annotated[int, Opt(help="Residual blocks per UNet level.")] = 2,
    dropout: Annotated[float, Opt(help="Dropout in the residual blocks.")] = 0.1,
    timesteps: Annotated[int, Opt(help="Diffusion steps T (linear betas 1e-4 .. 0.02).")] = 1000,
    ema_decay: Annotated[float, Opt(help="EMA decay of the denoiser weights.")] = 0.9999,
    warmup_steps: Annotated[int, Opt(help="Linear learning-rate warm-up steps.")] = 5000,
    epochs: Annotated[int, Opt(help="Passes over the training split.")] = 50,
    max_steps: Annotated[int | None, Opt(help="Stop after this many steps.")] = None,
    batch_size: Annotated[int, Opt(help="Tuples per step (every modality's denoiser sees each).")] = 64,
    lr: Annotated[float, Opt(help="Adam learning rate after the warm-up.")] = 2e-4,
    grad_clip: Annotated[float, Opt(help="Global gradient-norm clip.")] = 1.0,
    amp: Annotated[bool | None, Opt("--amp/--no-amp", help="Autocast the denoisers (default: on for CUDA and "
                                                             "AMX CPUs).",
                                    show_default=False)] = None,
    amp_dtype: Annotated[str, Opt(help="bf16 | fp16.")] = "bf16",
    compile: Annotated[bool, Opt("--compile/--no-compile", help="torch.compile the step.")] = False,
    channels_last: Annotated[bool, Opt("--channels-last/--no-channels-last", help="channels_last convolutions.")]
    = True,
    checkpoint_every: Annotated[int, Opt(help="Steps between checkpoints (0: epoch ends and stops only).")] = 0,
    keep: Annotated[int, Opt(help="ckpt-{step}.pt files kept.")] = 3,
    seed: Annotated[int, Opt(help="Seed of the denoisers, the noise and the data order.")] = 0,
    device: Annotated[str, Opt(help="auto | cpu | cuda | cuda:N.")] = "auto",
    out: Annotated[Path | None, Opt(help="Folder of the diffusion run (default RUN_DIR/diffusion).")] = None,
    log_every: Annotated[int, Opt(help="Steps between loss reads.")] = 20,
    log: Annotated[str, Opt(help="Extra logging sinks: tensorboard, wandb.")] = "",
    eval_every: Annotated[int, Opt(help="Epochs between test-subset evaluations (0: none).")] = 1,
    threads: Annotated[int | None, Opt(help="CPU threads for torch.")] = None,
    loader: Annotated[str, Opt(help="resident | files | webdataset | dali.")] = "resident",
    workers: Annotated[int, Opt(help="Loader workers.")] = 2,
    data_root: Annotated[str | None, Opt(help="Folder of named data sets (default: the run's).")] = None,
    nproc: Annotated[int, Opt(help="Data-parallel processes.")] = 1,
    resume: Annotated[bool, Opt(help="Continue the diffusion run in --out with its saved settings (--epochs, "
                                     "--max-steps, --device, --threads, logging and checkpoint cadence may "
                                     "change).")] = False,
    overwrite: Annotated[bool, Opt(help="Replace the diffusion run already in --out.")] = False,
) -> None:
    """Train D-CMVAE's denoisers (one conditional UNet per modality) on the frozen CMVAE of RUN_DIR; writes the
    run into RUN_DIR/diffusion (metrics.jsonl, checkpoints, samples.png)."""
    from cmvae_engine.engine.cli.train_cmd import explicit_flags
    from cmvae_engine.engine.diffusion_run import RESUMABLE, diffusion_config, resume_config
    from cmvae_engine.engine.signals import Stopped
    from cmvae_engine.engine.trainer import train

    flags = {k: v for k, v in locals().items() if k not in ("ctx", "train", "Stopped", "explicit_flags",
                                                            "RESUMABLE", "diffusion_config", "resume_config")}
    console, errors = Console(), Console(stderr=True, soft_wrap=True)
    try:
        if resume:
            given = explicit_flags(ctx, flags)
            refused = sorted(given - set(RESUMABLE) - {"run_dir", "out", "resume"})
            if refused:
                raise ValueError(f"--resume continues the run with its saved settings; "
                                 f"{', '.join('--' + r.replace('_', '-') for r in refused)} cannot change. Fix: "
                                 "drop them, or start a new run with --overwrite")
            cfg = resume_config(run_dir, out, **{k: flags[k] for k in given & set(RESUMABLE)})
        else:
            kw = {k: v for k, v in flags.items() if k not in ("run_dir", "resume")}
            cfg = diffusion_config(run_dir, console=console, **kw)
        train(cfg, console)
    except Stopped as e:
        raise typer.Exit(e.exit_code) from None
    except (ValueError, FileNotFoundError) as e:
        errors.print(Text(f"error: {e}", style="red"))
        raise typer.Exit(EXIT_BAD_INPUT) from None
    except (FloatingPointError, RuntimeError) as e:
        errors.print(Text(f"error: {e}", style="red"))
        raise typer.Exit(EXIT_FAILED) from None
