"""`cmvae-engine eval RUN_DIR`: clustering, coherence, latent probes and (with --fid) FID of a run."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.text import Text

from cmvae_engine.cmvae.checks import COUNT, SEED, THREADS, Rule, check_flags
from cmvae_engine.cmvae.data.errors import DataError
from cmvae_engine.cmvae.data.format import SPLITS
from cmvae_engine.cmvae.diffusion.config import DEFAULT_STRENGTH, STRENGTH_RULE

Opt = typer.Option


def eval_command(
    run_dir: Annotated[str, typer.Argument(help="Run folder of `cmvae-engine train` (uses pruned.pt when present).")],
    split: Annotated[str, Opt(help="Split to evaluate: test | valid | train.")] = "test",
    checkpoint: Annotated[str | None, Opt(help="Checkpoint file in the run folder (default pruned.pt, else "
                                               "checkpoint.pt).")] = None,
    fid: Annotated[bool, Opt("--fid/--no-fid", help="Compute unconditional and conditional FID.")] = False,
    inception_weights: Annotated[str | None, Opt(help="pt_inception-2015-12-05-6726825d.pth (default: searched "
                                                      "near the data and in torch's hub cache).")] = None,
    n_fid: Annotated[int, Opt(help="Samples per FID set (>= 2048).")] = 10000,
    fid_split: Annotated[str | None, Opt(help="Split of real/conditioning images for FID (default --split).")] = None,
    coherence: Annotated[bool, Opt("--coherence/--no-coherence", help="Coherence with digit classifiers.")] = True,
    clustering: Annotated[bool, Opt("--clustering/--no-clustering", help="NMI/ARI/ACC.")] = True,
    latent: Annotated[bool, Opt("--latent/--no-latent", help="Linear probes on z and w.")] = True,
    classifiers: Annotated[str | None, Opt(help="Folder of digit classifiers (default: searched near the "
                                                "data).")] = None,
    n_unconditional: Annotated[int, Opt(help="Prior samples for unconditional coherence.")] = 10000,
    n_latent_train: Annotated[int, Opt(help="Train tuples for the latent probes (random subset).")] = 5000,
    batch_size: Annotated[int, Opt(help="Tuples per forward pass.")] = 1000,
    data_root: Annotated[str | None, Opt(help="Folder of named data sets (default: the run's).")] = None,
    device: Annotated[str, Opt(help="auto | cpu | cuda | cuda:N.")] = "auto",
    seed: Annotated[int, Opt(help="Seed of every sampling step.")] = 0,
    threads: Annotated[int | None, Opt(help="CPU threads for torch.")] = None,
    diffusion: Annotated[bool, Opt("--diffusion", help="Score the CMVAE's and D-CMVAE's samples side by side "
                                                       "(RUN_DIR/eval_diffusion.json) instead of the CMVAE eval.")]
    = False,
    diffusion_dir: Annotated[str | None, Opt(help="With --diffusion: the diffusion run (default "
                                                  "RUN_DIR/diffusion).")] = None,
    n_diffusion: Annotated[int, Opt(help="With --diffusion: unconditional samples (and conditioning tuples, at "
                                         "most the split's).")] = 1000,
    sampler: Annotated[str, Opt(help="With --diffusion: ddim | ddpm.")] = "ddim",
    steps: Annotated[int, Opt(help="With --diffusion: DDIM steps.")] = 50,
    strength: Annotated[float, Opt(help="With --diffusion: how far into the forward process sampling starts: 1 from "
                                        "pure noise; less from the CMVAE sample noised to that fraction of the "
                                        "steps.")] = DEFAULT_STRENGTH,
) -> None:
    """Evaluate a trained run the way the paper does; writes RUN_DIR/eval.json and prints tables."""
    from cmvae_engine.engine.eval_run import EvalConfig, run_eval  # heavy imports only when the command runs

    console = Console()
    if diffusion:
        from cmvae_engine.engine.eval_diffusion import eval_diffusion

        try:
            check_flags(("--split", split, Rule(SPLITS), "test"), ("--n-diffusion", n_diffusion, COUNT, 1000),
                        ("--steps", steps, COUNT, 50), ("--seed", seed, SEED, 0),
                        ("--strength", strength, STRENGTH_RULE, DEFAULT_STRENGTH))
            if threads:
                import torch

                torch.set_num_threads(threads)
            eval_diffusion(run_dir, diffusion_dir=diffusion_dir, split=split, n_unconditional=n_diffusion,
                           n_conditional=n_diffusion, sampler=sampler, steps=steps, strength=strength,
                           classifiers=classifiers,
                           inception_weights=inception_weights, seed=seed, device=device, data_root=data_root,
                           console=console)
        except (DataError, ValueError, FileNotFoundError, ModuleNotFoundError) as e:
            Console(stderr=True, soft_wrap=True).print(Text(f"error: {e}", style="red"))
            raise typer.Exit(2) from None
        return
    try:
        check_flags(("--split", split, Rule(SPLITS), "test"),
                    ("--fid-split", fid_split, Rule(SPLITS, optional=True), "train"),
                    ("--n-fid", n_fid, COUNT, 10000), ("--n-unconditional", n_unconditional, COUNT, 10000),
                    ("--n-latent-train", n_latent_train, Rule(int, low=10), 5000),
                    ("--batch-size", batch_size, COUNT, 1000), ("--seed", seed, SEED, 0),
                    ("--threads", threads, THREADS, 1))
        cfg = EvalConfig(
            run_dir=run_dir, split=split, checkpoint=checkpoint, clustering=clustering, coherence=coherence,
            latent=latent, fid=fid, inception_weights=inception_weights, n_fid=n_fid, fid_split=fid_split,
            classifiers=classifiers, n_unconditional=n_unconditional, n_latent_train=n_latent_train,
            batch_size=batch_size, device=device, seed=seed, data_root=data_root, threads=threads,
        )
        run_eval(cfg, console)
    except (DataError, ValueError, FileNotFoundError, ModuleNotFoundError) as e:
        # Text, not markup: messages hold paths and brackets.
        Console(stderr=True, soft_wrap=True).print(Text(f"error: {e}", style="red"))
        raise typer.Exit(2) from None
