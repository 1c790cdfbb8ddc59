"""The training loop: a short step (data, forward, loss, backward, optimiser) with logging, evaluation,
checkpoints and images hanging off the outer loop. The loss is read on the host only at log intervals."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from cmvae.clustering import assign_clusters, encode_split, to_float
from cmvae.data import read_dataset, resolve_dataset
from cmvae.metrics import clustering_scores
from cmvae.model import CMVAE
from cmvae.objectives import loss_fn
from engine.checkpoint import atomic_write_json, save_checkpoint
from engine.config import TrainConfig
from engine.images import save_grid
from engine.loaders import ResidentLoader, stack_modalities
from engine.recipes import StepContext, build_recipe


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return dev


@dataclass
class SplitData:
    images: torch.Tensor          # uint8 [M, N, C, H, W]
    labels: np.ndarray | None


def load_splits(cfg: TrainConfig) -> tuple[dict[str, SplitData], dict]:
    root = resolve_dataset(cfg.data.dataset, data_root=cfg.data.data_root)
    ds = read_dataset(root)
    splits = {name: SplitData(stack_modalities(s.modalities), s.labels) for name, s in ds.splits.items()}
    info = {"root": str(root), "name": ds.name, "modalities": ds.modality_names,
            "n": {k: v.images.shape[1] for k, v in splits.items()}}
    return splits, info


@torch.no_grad()
def evaluate(model: CMVAE, cfg: TrainConfig, split: SplitData, device: torch.device) -> dict:
    """Test bound per datapoint and clustering scores of the majority vote of argmax p(c|z_m)."""
    model.eval()
    g = torch.Generator(device=device)
    g.manual_seed(cfg.seed + 12345)
    total, n = torch.zeros((), device=device), split.images.shape[1]
    bs = max(cfg.optim.batch_size, 256)
    for start in range(0, n, bs):
        x = to_float(split.images[:, start:start + bs].to(device))
        out = loss_fn(model, x, objective="iwae", n_samples=cfg.n_samples, beta=cfg.beta, generator=g)
        total += out.bound.sum()
    result = {"test_bound": total.item() / n}  # sync point
    if split.labels is not None and model.config.kind == "cmvae":
        lat = encode_split(model, split.images, batch_size=bs, generator=g, device=device)
        _, vote = assign_clusters(lat.resp)
        scores = clustering_scores(split.labels, vote.cpu().numpy())
        result.update({f"test_{k}": v for k, v in scores.items()})
    model.train()
    return result


def save_images(model: CMVAE, split: SplitData, out: Path, device: torch.device, seed: int) -> None:
    """recon.png: inputs and self-reconstructions of 8 test tuples; samples.png: rows = active clusters
    by prior mass (at most 16), columns = 4 samples of each modality."""
    model.eval()
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    x = to_float(split.images[:, :8].to(device))
    rec = model.reconstruct(x)
    rows = torch.stack([t for m in range(x.shape[0]) for t in (x[m], rec[m])])
    save_grid(out / "recon.png", rows)
    log_pi = model.prior_params()[0]
    order = [int(c) for c in torch.argsort(log_pi, descending=True) if torch.isfinite(log_pi[c])][:16]
    per_cluster = [model.generate(4, cluster=c, generator=g) for c in order]  # each [M, 4, C, H, W]
    grid = torch.stack([s.flatten(0, 1) for s in per_cluster])  # [rows, M*4, C, H, W]
    save_grid(out / "samples.png", grid)
    model.train()


def train(cfg: TrainConfig, console: Console | None = None) -> dict:
    """Train a model as configured; returns the last metrics row. Outputs go to cfg.out."""
    console = console or Console()
    device = resolve_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)

    splits, data_info = load_splits(cfg)
    m = splits["train"].images.shape[0]
    if cfg.model.n_modalities != m:
        cfg.model.n_modalities = m  # the data decides M
    model = CMVAE(cfg.model).to(device)
    recipe = build_recipe(cfg.recipe)
    opt = torch.optim.Adam(recipe.param_groups(model, cfg.optim.lr), lr=cfg.optim.lr, amsgrad=cfg.optim.amsgrad)
    loader = ResidentLoader(splits["train"].images, cfg.optim.batch_size, seed=cfg.seed,
                            drop_last=cfg.data.drop_last, device=device)
    test = splits["test"]
    atomic_write_json(out / "config.json", {"config": cfg.to_dict(), "data": data_info})

    width_note = f"width {cfg.model.width:g}" + (" (REDUCED networks)" if cfg.model.reduced else " (reference)")
    console.print(f"[bold]cmvae-engine train[/] {data_info['name']} ({loader.n} train tuples, M={m}) on "
                  f"{device}, {width_note}, K={cfg.model.n_clusters}, {cfg.objective} S={cfg.n_samples}, "
                  f"beta={cfg.beta} -> {out}")

    metrics_path = out / "metrics.jsonl"
    metrics_path.unlink(missing_ok=True)
    total_steps = cfg.optim.epochs * len(loader)
    if cfg.optim.max_steps is not None:
        total_steps = min(total_steps, cfg.optim.max_steps)
    step, t_start, last = 0, time.perf_counter(), {}
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), TextColumn("{task.fields[stats]}"), console=console)
    with progress:
        task = progress.add_task("train", total=total_steps, stats="")
        for epoch in range(cfg.optim.epochs):
            if step >= total_steps:
                break
            run_loss, run_n = torch.zeros((), device=device), 0
            ep_loss, ep_n, t_log, n_log = torch.zeros((), device=device), 0, time.perf_counter(), 0
            for xb in loader.epoch(epoch):
                x = to_float(xb)
                beta = recipe.beta(step, cfg.beta)
                out_ = loss_fn(model, x, objective=cfg.objective, n_samples=cfg.n_samples, beta=beta)
                opt.zero_grad(set_to_none=True)
                out_.loss.backward()
                opt.step()
                b = x.shape[1]
                run_loss += -out_.bound.sum()
                run_n += b
                step += 1
                n_log += b
                recipe.after_step(StepContext(step, epoch, model, opt, loader.images, device, console))
                if step % cfg.log_every == 0 or step == total_steps:
                    loss_val = run_loss.item() / run_n  # sync point
                    if not math.isfinite(loss_val):
                        raise FloatingPointError(f"non-finite loss at step {step}; the last checkpoint is kept")
                    now = time.perf_counter()
                    rate = n_log / (now - t_log)
                    progress.update(task, stats=f"epoch {epoch + 1} loss {loss_val:,.1f} {rate:,.0f} samples/s")
                    ep_loss += run_loss
                    ep_n += run_n
                    run_loss, run_n, t_log, n_log = torch.zeros((), device=device), 0, now, 0
                progress.update(task, advance=1)
                if step >= total_steps:
                    break
            ep_loss += run_loss
            ep_n += run_n
            elapsed = time.perf_counter() - t_start
            row = {"epoch": epoch + 1, "step": step, "train_loss": ep_loss.item() / max(ep_n, 1),
                   "elapsed_s": elapsed, "samples_per_s": step * cfg.optim.batch_size / elapsed,
                   "width": cfg.model.width, "reduced": cfg.model.reduced}
            if cfg.eval_every and ((epoch + 1) % cfg.eval_every == 0 or step >= total_steps):
                row.update(evaluate(model, cfg, test, device))
            with metrics_path.open("a") as f:
                f.write(json.dumps(row) + "\n")
            last = row
            save_checkpoint(out / "checkpoint.pt", model=model, optimizer=opt, config=cfg.to_dict(),
                            state={"epoch": epoch + 1, "step": step, "metrics": row})
            progress.console.print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                            for k, v in row.items() if k not in ("width", "reduced")))
    save_images(model, test, out, device, cfg.seed)
    console.print(f"[green]done[/] in {time.perf_counter() - t_start:.0f}s. Outputs in {out}/: "
                  "metrics.jsonl, checkpoint.pt, config.json, recon.png, samples.png")
    return last
