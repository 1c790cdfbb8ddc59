"""`cmvae-engine prune RUN_DIR`: cluster selection on a run folder.

Reads checkpoint.pt and the run's data set, draws one z per datapoint and modality on the validation split (one
encoder pass), runs every pruning step from those cached latents (cmvae.prune), scores each step's cluster set
on the test split, and writes prune.json, prune.png (PNE, NMI, ARI against the number of clusters) and
pruned.pt (the checkpoint with the unchosen clusters at zero prior mass).
"""

from __future__ import annotations

import copy
import io
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from cmvae_engine.cmvae.data import read_dataset, resolve_dataset
from cmvae_engine.cmvae.metrics import clustering_scores, contingency
from cmvae_engine.cmvae.model import CMVAE
from cmvae_engine.cmvae.prune import (
    PruneResult,
    apply_pruning,
    assign_with,
    check_options,
    component_logpdf,
    draw_latents,
    prune_latents,
)
from cmvae_engine.engine.checkpoint import atomic_write_bytes, atomic_write_json, save_checkpoint
from cmvae_engine.engine.config import TrainConfig
from cmvae_engine.engine.loaders import stack_modalities
from cmvae_engine.engine.progress import Board
from cmvae_engine.engine.run import load_run
from cmvae_engine.engine.run_info import run_info

PRUNED_CHECKPOINT = "pruned.pt"


def model_checkpoint(run_dir: str | Path, console: Console | None = None) -> str:
    """The checkpoint that evaluation and generation should use: pruned.pt when present, else checkpoint.pt.

    Warns when pruned.pt is older than checkpoint.pt (training went on after pruning)."""
    run_dir = Path(run_dir)
    pruned, trained = run_dir / PRUNED_CHECKPOINT, run_dir / "checkpoint.pt"
    if not pruned.is_file():
        return "checkpoint.pt"
    if console is not None and trained.is_file() and trained.stat().st_mtime > pruned.stat().st_mtime:
        console.print(f"[yellow]warning:[/] {escape(str(pruned))} is older than {escape(str(trained))}; run "
                      f"`cmvae-engine prune {escape(str(run_dir))}` again to select clusters of the latest model")
    return PRUNED_CHECKPOINT


def load_split(cfg: TrainConfig, name: str,
               data_root: str | Path | None = None) -> tuple[torch.Tensor, np.ndarray | None, str, bool]:
    """(uint8 images [M, N, C, H, W], labels, split used, fell back to test) of the run's data set."""
    root = resolve_dataset(cfg.data.dataset, data_root=data_root or cfg.data.data_root)
    data = read_dataset(root, mmap=True)
    fell_back = name == "valid" and "valid" not in data.splits
    used = "test" if fell_back else name
    split = data.split(used)
    labels = None if split.labels is None else np.asarray(split.labels)
    return stack_modalities(split.modalities), labels, used, fell_back


def count_macs(module: torch.nn.Module, *inputs_shapes: tuple[int, ...]) -> int:
    """Multiply-accumulates of one forward pass (convolutions and linear layers), counted on the meta device."""
    meta = copy.deepcopy(module).to("meta")
    total = 0

    def hook(mod: torch.nn.Module, args: tuple, out: torch.Tensor) -> None:
        nonlocal total
        if isinstance(mod, torch.nn.Conv2d):
            kh, kw = mod.kernel_size
            total += out.numel() * (mod.in_channels // mod.groups) * kh * kw
        elif isinstance(mod, torch.nn.Linear):
            total += out.numel() * mod.in_features

    layers = [m for m in meta.modules() if isinstance(m, torch.nn.Conv2d | torch.nn.Linear)]
    handles = [m.register_forward_hook(hook) for m in layers]
    try:
        meta(*(torch.empty(s, device="meta") for s in inputs_shapes))
    finally:
        for h in handles:
            h.remove()
    return total


def work_count(model: CMVAE, n_select: int, image_shape: tuple[int, ...]) -> dict:
    """Network work of the reference procedure against ours, for selecting clusters on n_select datapoints.

    The reference, at each of its K steps, re-encodes the split (M encoders, two towers each) and runs all M*M
    decoders (self and cross reconstructions); we encode once and call no decoder."""
    cfg = model.config
    m, k = cfg.n_modalities, cfg.n_clusters
    enc = count_macs(model.encoders[0], (1, *image_shape))
    dec = count_macs(model.decoders[0], (1, cfg.z_dim + cfg.w_dim))
    ref = k * n_select * (m * enc + m * m * dec)
    ours = n_select * m * enc
    # log p(z_m | c) once (~3 flops per element), then per step ~12 flops per (m, datapoint, cluster).
    mixture = n_select * m * k * (3 * cfg.z_dim + 12 * k)
    return {
        "encoder_macs_per_sample": enc, "decoder_macs_per_sample": dec,
        "reference": {"steps": k, "encoder_passes": k * n_select * m, "decoder_passes": k * n_select * m * m,
                      "network_macs": ref},
        "ours": {"encoder_passes": n_select * m, "decoder_passes": 0, "network_macs": ours,
                 "mixture_flops": mixture},
        "network_mac_ratio": ref / max(ours, 1),
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def score_steps(model: CMVAE, z_test: torch.Tensor, labels: np.ndarray | None, curve: list[dict],
               assign: str) -> list[np.ndarray]:
    """Assignments of the test split under every step's cluster set; adds test_nmi/ari/acc to the curve."""
    comp = component_logpdf(model, z_test)
    out = []
    for entry in curve:
        cluster = assign_with(model, z_test, entry["active"], assign, comp=comp).cpu().numpy()
        out.append(cluster)
        if labels is not None:
            scores = clustering_scores(labels, cluster)
            entry.update({"test_nmi": scores["nmi"], "test_ari": scores["ari"], "test_acc": scores["acc"]})
    return out


def falls_throughout(result: PruneResult) -> bool:
    """True when the score fell at every step down to 2 clusters: the sign of a prior whose clusters have not
    formed (DESIGN section 3), not of 2 true clusters."""
    pnes = [e["pne"] for e in result.curve if e["k"] >= 2]
    return result.chosen_k == 2 and all(a >= b for a, b in zip(pnes, pnes[1:], strict=False))


def _note(result: PruneResult, k0: int, chosen_score: float) -> str:
    if not result.improved:
        return (f"no pruned set scored below the unpruned model (PNE {result.baseline_score:.4f}): all {k0} "
                "clusters are kept")
    if falls_throughout(result):
        return ("the score fell at every step down to 2 clusters: the prior's clusters have probably not formed "
                "yet (train longer); selection is only as good as the trained prior")
    return f"pruned {k0} -> {result.chosen_k} clusters (PNE {result.baseline_score:.4f} -> {chosen_score:.4f})"


def prune_run(run_dir: str | Path, *, entropy_norm: str = "initial", assign: str = "vote", split: str = "valid",
              device: str = "auto", seed: int = 0, batch_size: int = 512, threads: int | None = None,
              data_root: str | Path | None = None, console: Console | None = None) -> dict:
    """Select clusters for a trained run; writes prune.json, prune.png and pruned.pt and returns the JSON."""
    from cmvae_engine.engine.trainer import resolve_device  # the trainer's imports are heavy; only needed here

    console = console or Console()
    check_options(entropy_norm, assign)
    if threads:
        torch.set_num_threads(threads)
    run_dir = Path(run_dir)
    dev = resolve_device(device)
    t_all = time.perf_counter()
    run = load_run(run_dir, device=dev)
    model, cfg = run.model, run.config
    if cfg.model.kind != "cmvae" or cfg.model.n_clusters < 2:
        raise ValueError(f"{run_dir}: prune needs a CMVAE with at least 2 clusters (this run: "
                         f"{cfg.model.kind}, K={cfg.model.n_clusters})")
    images, labels, used, fell_back = load_split(cfg, split, data_root)
    if fell_back:
        console.print("[yellow]warning:[/] the data set has no valid split; selecting clusters on the TEST split "
                      "(test scores are then not held out)")
    if images.shape[0] != cfg.model.n_modalities:
        raise ValueError(f"{run_dir}: the data set has {images.shape[0]} modalities, the model "
                         f"{cfg.model.n_modalities}; check the run's data set ({cfg.data.dataset})")
    k0 = int(model.cluster_active.sum())
    g = torch.Generator(device=dev)
    g.manual_seed(seed)

    mass_before = model.prior_params()[0].detach().exp().cpu().tolist()
    t0 = time.perf_counter()
    with Board(console) as board:
        with board.phase(f"prune: encoding the {used} split ({images.shape[1]:,} tuples)") as bar:
            z = draw_latents(model, images, batch_size=batch_size, generator=g, progress=bar)
            _sync(dev)
        t1 = time.perf_counter()
        result = prune_latents(model, z, beta=cfg.beta, labels=labels, entropy_norm=entropy_norm, assign=assign)
        _sync(dev)
        t2 = time.perf_counter()
        test_images, test_labels, _, _ = load_split(cfg, "test", data_root)
        with board.phase(f"prune: scoring every step on the test split ({test_images.shape[1]:,} tuples)") as bar:
            z_test = draw_latents(model, test_images, batch_size=batch_size, generator=g, progress=bar)
            test_assign = score_steps(model, z_test, test_labels, result.curve, assign)
            _sync(dev)
    t3 = time.perf_counter()

    step = next(i for i, e in enumerate(result.curve) if e["active"] == result.chosen)
    if test_labels is not None:
        test = clustering_scores(test_labels, test_assign[step])
        test["confusion"] = contingency(test_labels, test_assign[step])
    else:
        test = {"nmi": None, "ari": None, "acc": None, "n_clusters": int(len(np.unique(test_assign[step])))}
    test.update({"k": result.chosen_k, "n": int(test_images.shape[1])})

    apply_pruning(model, result.chosen)
    mass_after = model.prior_params()[0].detach().exp().cpu().tolist()
    save_checkpoint(run_dir / PRUNED_CHECKPOINT, model=model, optimizer=None, config=cfg.to_dict(),
                    state={**run.state, "pruned": {"from": "checkpoint.pt", "chosen": result.chosen,
                                                   "chosen_k": result.chosen_k, "improved": result.improved}})
    note = _note(result, k0, result.curve[step]["pne"])
    report = {
        "run": str(run_dir), "checkpoint": "checkpoint.pt", "pruned_checkpoint": PRUNED_CHECKPOINT,
        "split": used, "split_fallback": fell_back, "n": int(images.shape[1]), "beta": cfg.beta,
        "entropy_norm": entropy_norm, "assign": assign, "seed": seed, "device": str(dev),
        "width": cfg.model.width, "reduced": cfg.model.reduced, "initial_k": k0,
        "chosen_k": result.chosen_k, "chosen": result.chosen, "improved": result.improved,
        "baseline_score": result.baseline_score, "chosen_score": result.curve[step]["pne"], "note": note,
        "falls_throughout": falls_throughout(result),
        "common_random_numbers": "one z draw per datapoint and modality, reused at every step",
        "test": test, "curve": result.curve,
        "prior_mass": {"before": mass_before, "after": mass_after},
        "timing": {"encode_s": t1 - t0, "steps_s": t2 - t1, "test_s": t3 - t2, "select_s": t2 - t0,
                   "total_s": time.perf_counter() - t_all},
        "work": work_count(model, int(images.shape[1]), tuple(images.shape[2:])),
        "run_info": run_info(dev),
    }
    png = plot_curve(result.curve, result.chosen_k, result.baseline_score,
                     title=f"{run_dir.name}: chosen K = {result.chosen_k} of {k0}")
    atomic_write_bytes(run_dir / "prune.png", png)
    report["timing"]["total_s"] = time.perf_counter() - t_all
    atomic_write_json(run_dir / "prune.json", report)
    show(report, console)
    return report


def plot_curve(curve: list[dict], chosen_k: int, baseline: float, title: str = "") -> bytes:
    """PNG bytes: PNE, NMI and ARI against the number of active clusters (the paper's Figure 2)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ks = [e["k"] for e in curve]
    fig = Figure(figsize=(12, 3.6), dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3)
    ax = axes[0]
    ax.plot(ks, [e["pne"] for e in curve], "o-", ms=3, color="#1f5fa8", label="PNE (selection split)")
    ax.axhline(baseline, ls="--", lw=1, color="#888", label="unpruned")
    ax.plot([chosen_k], [next(e["pne"] for e in curve if e["k"] == chosen_k)], "o", ms=8, mfc="none",
            mec="#2a9d55", mew=2)
    ax.set_title("penalised normalised entropy")
    for ax, key, name in ((axes[1], "nmi", "NMI"), (axes[2], "ari", "ARI")):
        if key in curve[0]:
            ax.plot(ks, [e[key] for e in curve], "o-", ms=3, color="#1f5fa8", label="selection split")
        if f"test_{key}" in curve[0]:
            ax.plot(ks, [e[f"test_{key}"] for e in curve], "s-", ms=3, color="#d9822b", label="test split")
        if key not in curve[0] and f"test_{key}" not in curve[0]:
            ax.text(0.5, 0.5, "no labels", ha="center", va="center", transform=ax.transAxes, color="#888")
        ax.set_title(name)
        ax.set_ylim(-0.05, 1.05)
    for ax in axes:
        ax.axvline(chosen_k, color="#2a9d55", lw=1.2, label=f"chosen K = {chosen_k}")
        ax.set_xlabel("number of clusters")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def show(report: dict, console: Console) -> None:
    curve = report["curve"]
    has_val, has_test = "nmi" in curve[0], "test_nmi" in curve[0]
    table = Table(title=f"pruning on the {report['split']} split (beta {report['beta']:g}, log K "
                        f"{report['entropy_norm']}, assignment {report['assign']}); drops: the cluster removed "
                        "next, H: entropy / log K, logp: log p(z) / Dz")
    cols = ["K", "drops", "PNE", "H", "logp"]
    cols += ["NMI", "ARI", "ACC"] if has_val else []
    cols += ["test NMI", "test ACC"] if has_test else []
    for c in cols:
        table.add_column(c, justify="right")
    for i, e in enumerate(curve):
        nxt = sorted(set(e["active"]) - set(curve[i + 1]["active"])) if i + 1 < len(curve) else []
        row = [str(e["k"]), ",".join(map(str, nxt)), f"{e['pne']:.3f}", f"{e['entropy']:.3f}", f"{e['loglik']:.3f}"]
        row += [f"{e[k]:.3f}" for k in ("nmi", "ari", "acc")] if has_val else []
        row += [f"{e['test_' + k]:.3f}" for k in ("nmi", "acc")] if has_test else []
        style = "bold green" if e["active"] == report["chosen"] else ("dim" if i == 0 else None)
        table.add_row(*row, style=style)
    console.print(table)
    t, w = report["test"], report["work"]
    scores = (f"test NMI {t['nmi']:.3f}  ARI {t['ari']:.3f}  ACC {t['acc']:.3f}" if t["nmi"] is not None
              else "test split unlabelled")
    console.print(f"[bold]chosen K = {report['chosen_k']}[/] of {report['initial_k']}: {report['note']}")
    console.print(f"{scores}  ({t['n_clusters']} clusters used on {t['n']} test tuples)")
    tm = report["timing"]
    console.print(f"selection {tm['select_s']:.2f}s (encode {tm['encode_s']:.2f}s + {len(curve)} steps "
                  f"{tm['steps_s']:.2f}s), test scoring {tm['test_s']:.2f}s on {report['device']}; the reference "
                  f"procedure would run {w['reference']['decoder_passes']:,} decoder and "
                  f"{w['reference']['encoder_passes']:,} encoder passes ({w['network_mac_ratio']:.0f}x our "
                  "network work)")
    console.print(f"wrote {report['run']}/prune.json, prune.png, {PRUNED_CHECKPOINT}", markup=False)
