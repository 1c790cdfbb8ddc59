"""`cmvae-engine eval RUN_DIR --diffusion`: the CMVAE's and D-CMVAE's samples scored side by side.

Writes RUN_DIR/eval_diffusion.json (and prints a table): unconditional and conditional coherence, the classifier
feature distance (cmvae/evaluation/diffusion_scores.py: a Frechet distance in our digit classifiers' penultimate
layer, not FID) and, when the Inception weights file is found, FID. Every figure is against the named split (the
test split by default); the samples are the same draws for both models (D-CMVAE denoises the CMVAE's samples).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from cmvae_engine.cmvae.clustering import to_float
from cmvae_engine.cmvae.data import resolve_dataset
from cmvae_engine.cmvae.evaluation.classifier import find_classifiers, load_classifier_folder, weak_classifiers
from cmvae_engine.cmvae.evaluation.diffusion_scores import compare_samples
from cmvae_engine.cmvae.evaluation.fid import find_inception_weights, load_fid_inception
from cmvae_engine.engine.checkpoint import atomic_write_json
from cmvae_engine.engine.generate_diffusion import load_diffusion, sampling_fns
from cmvae_engine.engine.progress import Board
from cmvae_engine.engine.prune_run import load_split
from cmvae_engine.engine.run_info import run_info

RESULT = "eval_diffusion.json"


def eval_diffusion(run_dir: str | Path, *, diffusion_dir: str | Path | None = None, split: str = "test",
                   n_unconditional: int = 1000, n_conditional: int = 500, sampler: str = "ddim", steps: int = 50,
                   eta: float = 0.0, strength: float = 1.0, classifiers: str | Path | None = None,
                   inception_weights: str | Path | None = None,
                   batch_size: int = 250, seed: int = 0, device: str = "auto", data_root: str | Path | None = None,
                   out: str | Path | None = None, console: Console | None = None) -> dict:
    from cmvae_engine.engine.trainer import resolve_device

    console = console or Console()
    dev = resolve_device(device)
    t0 = time.perf_counter()
    run, folder = load_diffusion(run_dir, diffusion_dir, dev)
    model = run.model
    m, c = model.n_modalities, model.cmvae.config.image_channels
    root = resolve_dataset(run.config.data.dataset, data_root=data_root or run.config.data.data_root)
    clf = (load_classifier_folder(classifiers, m, c) if classifiers is not None
           else find_classifiers(root, m, c, polymnist=run.config.data.dataset.lower() == "polymnist"))
    if clf is None:
        raise FileNotFoundError(f"no digit classifiers for {root}; the comparison needs one per modality. Train "
                                f"them once with `cmvae-engine classifiers train {run.config.data.dataset}` or pass "
                                "--classifiers DIR")
    clf.to(dev)
    weights = inception_weights or find_inception_weights(root)
    inception = load_fid_inception(weights, dev) if weights else None
    images, labels, used, _ = load_split(run.config, split, data_root)
    if labels is None:
        raise ValueError(f"the {used} split of {root} has no labels; coherence needs them")
    real = to_float(images.to(dev))
    g = torch.Generator(device=dev)
    g.manual_seed(seed)
    kw = dict(sampler=sampler, steps=min(steps, model.config.timesteps), eta=eta, strength=strength,
              eps_fns=sampling_fns(model, dev))
    with Board(console) as board, board.phase(
            f"eval --diffusion: {n_unconditional} unconditional + {m} x {min(n_conditional, real.shape[1])} "
            f"conditional samples, CMVAE and D-CMVAE ({sampler})", done_line=False) as bar:
        scores = compare_samples(model, clf, real, labels, n_unconditional=n_unconditional,
                                 n_conditional=n_conditional, batch_size=batch_size, generator=g,
                                 inception=inception, progress=bar, **kw)
    result = {"diffusion_run": str(folder), "cmvae_checkpoint": model.config.cmvae_checkpoint, "split": used,
              "sampler": sampler, "steps": kw["steps"], "eta": eta, "strength": strength, "seed": seed,
              "denoiser": {"base": model.config.base, "reduced": model.config.reduced,
                           "steps_trained": int(model.ema_updates)},
              "classifiers": clf.describe(), "weak_classifiers": weak_classifiers(clf.test_accuracy),
              "fid": "computed" if inception is not None else "skipped: no Inception weights file found",
              **scores, "seconds": time.perf_counter() - t0, "run_info": run_info(dev)}
    path = Path(out) if out is not None else Path(run_dir) / RESULT
    atomic_write_json(path, result)
    render(result, console)
    console.print(f"wrote {path}", markup=False)
    return result


def relative_change(cmvae: float, dcmvae: float) -> float:
    return (dcmvae - cmvae) / cmvae if cmvae else float("nan")


def render(result: dict, console: Console) -> None:
    table = Table(title=f"CMVAE vs D-CMVAE samples ({result['split']} split; {result['sampler']} "
                        f"{result['steps']} steps)")
    for col in ("samples", "metric", "CMVAE", "D-CMVAE", "change"):
        table.add_column(col)
    for kind in ("unconditional", "conditional"):
        a, b = result[kind]["cmvae"], result[kind]["dcmvae"]
        for metric in ("classifier_fd", "coherence", "fid"):
            if metric in a:
                change = (f"{relative_change(a[metric], b[metric]):+.1%}" if metric != "coherence"
                          else f"{b[metric] - a[metric]:+.3f}")
                table.add_row(kind, metric, f"{a[metric]:.3f}", f"{b[metric]:.3f}", change)
    console.print(table)
