"""Convergence benchmark: how soon each recipe gives a clustered model, against wall-clock time and steps.

Each (recipe, seed) trains for a wall-clock budget. Every `eval_every_steps` steps the clock stops and the
model is scored on each split of `score_splits` (valid and test by default), each in its own columns named by
the split (`valid_nmi`, `test_nmi`, ...): NMI, ARI, ACC of the majority vote of argmax p(c|z_m) over all K
clusters, the clusters in use, and (every `prune_every` evaluations, and always at the end) the cluster set
chosen by pruning from all K clusters on the validation split (`prune_split`), scored on every split with that
set (`valid_pruned_nmi`, `test_pruned_nmi`, ...). Choose settings on the valid columns; the test columns are for
the final report. The x-axis is training time only (steps, recipe hooks, data); evaluation time is recorded
separately. One z-tower pass per split and evaluation: the same z draw serves the vote and the pruned assignment
(common random numbers).

Writes `bench/results/convergence-{dataset}-{device}-w{width}-{time}.json` (rewritten after every run, so a
stopped benchmark keeps its finished runs) and a `.png` with NMI against time and against steps.
"""

from __future__ import annotations

import math
import os
import platform
import subprocess
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from cmvae_engine.cmvae.clustering import z_posterior
from cmvae_engine.cmvae.config import ModelConfig
from cmvae_engine.cmvae.data import read_dataset, resolve_dataset
from cmvae_engine.cmvae.distributions import rsample
from cmvae_engine.cmvae.metrics import clustering_scores
from cmvae_engine.cmvae.model import CMVAE
from cmvae_engine.cmvae.prune import assign_with, prune_latents
from cmvae_engine.engine.checkpoint import atomic_write_bytes, atomic_write_json
from cmvae_engine.engine.config import DataConfig, FastRecipeConfig, OptimConfig, StepConfig, TrainConfig
from cmvae_engine.engine.kmeans import kmeans
from cmvae_engine.engine.loaders import ResidentLoader, stack_modalities
from cmvae_engine.engine.recipes import StepContext, build_recipe
from cmvae_engine.engine.step import TrainStep, build_optimizer, prepare_model, resolve_options
from cmvae_engine.engine.tasks import task_for
from cmvae_engine.engine.tasks.cmvae_task import CMVAEObjective
from cmvae_engine.engine.warm_start import WarmStartContext

THRESHOLDS = (0.5, 0.8, 0.9)
SCORED = ("nmi", "pruned_nmi")
"""Scores (per split: `{split}_nmi`, ...) whose first crossing of each threshold is reported."""
SPLITS = ("valid", "test")


@dataclass
class ConvergenceSettings:
    dataset: str = "polydigits"
    """A built-in data set name or a data folder (needs labels on test; valid is used for pruning if present)."""
    recipes: list[str] = field(default_factory=lambda: ["paper", "fast"])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    budget_minutes: float = 15.0
    """Training wall time per (recipe, seed), evaluation excluded."""
    max_steps: int | None = None
    """Stop a run at this step even when budget is left (short checks)."""
    stop_at_k: int | None = None
    """Stop a run at the first evaluation whose pruning chooses exactly this many clusters (time to clusters)."""
    eval_every_steps: int = 50
    prune_every: int = 1
    """Prune at every n-th evaluation (0: only at the end)."""
    width: float = 0.25
    clusters: int = 40
    batch_size: int = 128
    lr: float = 1e-3
    beta: float = 2.5
    device: str = "auto"
    threads: int | None = None
    data_root: str | None = None
    fast: FastRecipeConfig = field(default_factory=FastRecipeConfig)
    step: StepConfig = field(default_factory=StepConfig)
    diagnostics: bool = False
    """Also score k-means (k = number of classes) on each modality's posterior means of every scored split (mean
    NMI over modalities, `{split}_kmeans_nmi`): how far the representation has come; it uses the label count and
    never feeds back."""
    score_splits: list[str] = field(default_factory=lambda: list(SPLITS))
    """Splits scored at every evaluation, each in its own columns; each needs labels."""
    out_dir: str = "bench/results"
    tag: str = ""

    def __post_init__(self) -> None:
        if not self.recipes or not self.seeds:
            raise ValueError("--recipes and --seeds must each name at least one")
        for r in self.recipes:
            build_recipe(r)  # raises on an unknown name
        if not self.budget_minutes > 0:
            raise ValueError(f"--budget-minutes must be > 0, got {self.budget_minutes}")
        if self.eval_every_steps < 1:
            raise ValueError(f"--eval-every-steps must be >= 1, got {self.eval_every_steps}")
        if self.prune_every < 0:
            raise ValueError(f"--prune-every must be >= 0, got {self.prune_every}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"--max-steps must be >= 1, got {self.max_steps}")
        bad = [x for x in self.score_splits if x not in SPLITS]
        if bad or not self.score_splits or len(set(self.score_splits)) != len(self.score_splits):
            raise ValueError(f"--score-splits takes distinct names from {','.join(SPLITS)}, got "
                             f"{','.join(self.score_splits) or 'nothing'}")
        if self.stop_at_k is not None and not 1 <= self.stop_at_k <= self.clusters:
            raise ValueError(f"--stop-at-k must be between 1 and --clusters ({self.clusters}), got {self.stop_at_k}")
        if self.stop_at_k is not None and self.prune_every != 1:
            raise ValueError("--stop-at-k needs pruning at every evaluation (--prune-every 1), got "
                             f"--prune-every {self.prune_every}")


# ----- provenance ------------------------------------------------------------------------------------------
def device_description(device: torch.device) -> str:
    """GPU name, or CPU model with the cores this process may use."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{model} ({cores} cores)"


def git_commit() -> dict:
    root = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10,
                                  check=True).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    head = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": head or "unknown", "dirty": None if status is None else bool(status)}


def loadavg() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return device


# ----- evaluation ------------------------------------------------------------------------------------------
@dataclass
class Splits:
    train: torch.Tensor
    scored: dict[str, tuple[torch.Tensor, np.ndarray]]
    """Each scored split's images [M, N, C, H, W] and labels [N], in the order scored."""
    valid: torch.Tensor
    valid_name: str
    """The split pruning selects on: valid, or test when the data set has no valid split."""
    name: str


def load_splits(s: ConvergenceSettings, console: Console) -> Splits:
    ds = read_dataset(resolve_dataset(s.dataset, data_root=s.data_root))
    if "test" not in ds.splits or ds.splits["test"].labels is None:
        raise ValueError(f"{s.dataset}: the convergence benchmark needs labels on the test split "
                         "(test/labels.npy); add them or choose a labelled data set")
    valid_name = "valid" if "valid" in ds.splits else "test"
    if valid_name == "test":
        console.print(f"[yellow]{s.dataset} has no valid split: pruning selects on the test split, and only the "
                      "test split is scored[/]")
    names = [x for x in s.score_splits if x in ds.splits]
    for x in names:
        if ds.splits[x].labels is None:
            raise ValueError(f"{s.dataset}: --score-splits names {x}, which has no labels ({x}/labels.npy); add "
                             f"them or leave {x} out of --score-splits")
    if not names:
        raise ValueError(f"{s.dataset}: none of --score-splits {','.join(s.score_splits)} is in the data set")
    imgs = {k: stack_modalities(v.modalities) for k, v in ds.splits.items()}
    scored = {x: (imgs[x], np.asarray(ds.splits[x].labels)) for x in names}
    return Splits(imgs["train"], scored, imgs[valid_name], valid_name, ds.name)


def _scores(labels: np.ndarray, clusters: torch.Tensor) -> dict:
    row = clustering_scores(labels, clusters.cpu().numpy())
    row["in_use"] = row.pop("n_clusters")
    return row


@torch.no_grad()
def evaluate(model: CMVAE, splits: Splits, *, beta: float, prune: bool, seed: int, diagnostics: bool) -> dict:
    """Scores of the model on each scored split, in columns `{split}_{score}`; with `prune`, the set chosen on
    the validation split (`pruned_k`) and every split's scores with that set (`{split}_pruned_{score}`).

    One z-tower pass per split and one z draw per datapoint and modality (the reference's sampled z)."""
    device = model.prior_logits.device
    g = torch.Generator(device=device).manual_seed(seed + 12345)
    family = model.config.family

    def draw(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loc, scale = z_posterior(model, images)
        return rsample(loc, scale, family, generator=g), loc

    drawn = {name: draw(images) for name, (images, _) in splits.scored.items()}
    row: dict = {}
    for name, (z, _) in drawn.items():
        row.update({f"{name}_{k}": v for k, v in _scores(splits.scored[name][1], assign_with(model, z)).items()})
    if prune:
        z_select = drawn[splits.valid_name][0] if splits.valid_name in drawn else draw(splits.valid)[0]
        res = prune_latents(model, z_select, beta=beta)
        row.update({"prune_split": splits.valid_name, "pruned_k": res.chosen_k, "pruned_improved": res.improved})
        for name, (z, _) in drawn.items():
            scores = _scores(splits.scored[name][1], assign_with(model, z, res.chosen))
            row.update({f"{name}_pruned_{k}": v for k, v in scores.items()})
    if diagnostics:
        g_km = torch.Generator(device=device).manual_seed(seed)
        for name, (_, loc) in drawn.items():
            labels = splits.scored[name][1]
            k = len(np.unique(labels))
            row[f"{name}_kmeans_nmi"] = float(np.mean([
                clustering_scores(labels, kmeans(loc_m, k, restarts=4, generator=g_km).labels.cpu().numpy())["nmi"]
                for loc_m in loc]))
    return row


def first_crossings(curve: list[dict], splits: list[str]) -> dict:
    """For each split, scored key and threshold (`test_pruned_nmi>=0.9`, ...): the training time and step of the
    first evaluation at or above it."""
    out = {}
    for split in splits:
        for key in SCORED:
            col = f"{split}_{key}"
            for t in THRESHOLDS:
                hit = next((r for r in curve if r.get(col) is not None and r[col] >= t), None)
                out[f"{col}>={t}"] = None if hit is None else {"train_s": hit["train_s"], "step": hit["step"]}
    return out


# ----- one run ---------------------------------------------------------------------------------------------
def train_config(s: ConvergenceSettings, recipe: str, seed: int, n_modalities: int) -> TrainConfig:
    return TrainConfig(
        model=ModelConfig(n_clusters=s.clusters, width=s.width, n_modalities=n_modalities),
        data=DataConfig(dataset=s.dataset, data_root=s.data_root),
        optim=OptimConfig(lr=s.lr, batch_size=s.batch_size),
        step=s.step, recipe=recipe, fast=s.fast, beta=s.beta, seed=seed, device=s.device, threads=s.threads,
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_one(s: ConvergenceSettings, splits: Splits, recipe_name: str, seed: int, device: torch.device,
            console: Console, on_progress=None) -> dict:
    """One (recipe, seed). `on_progress(partial)` gets the run so far (with "complete": False) after every
    evaluation, so that a run stopped from outside keeps its curve."""
    cfg = train_config(s, recipe_name, seed, splits.train.shape[0])
    load_start = loadavg()
    torch.manual_seed(seed)
    model = CMVAE(cfg.model).to(device)
    recipe = build_recipe(recipe_name, s.fast, beta=s.beta)
    opts = resolve_options(s.step, device)
    task = task_for(cfg.model.kind)
    task.prepare(model, opts)
    prepare_model(model, task.networks(model), opts, device)
    opt = build_optimizer(recipe.param_groups(model, s.lr), s.lr, True, opts)
    step_fn = TrainStep(CMVAEObjective(model, "iwae", 1, aux=recipe.aux_loss()), opt, opts, device)
    loader = ResidentLoader(splits.train, s.batch_size, seed=seed, drop_last=opts.compile, device=device)
    budget_s = s.budget_minutes * 60.0
    curve: list[dict] = []
    train_s = eval_s = 0.0
    step = epoch = n_evals = 0

    def record(final: bool) -> None:
        nonlocal eval_s, n_evals
        _sync(device)
        t0 = time.perf_counter()
        prune = final or (s.prune_every > 0 and n_evals % s.prune_every == 0)
        stats = step_fn.stats
        loss = float(stats.loss) / stats.n if stats.n else None  # sync point (evaluations only)
        stats.reset()
        row = {"step": step, "epoch": epoch, "train_s": round(train_s, 3), "train_loss": loss,
               **evaluate(model, splits, beta=s.beta, prune=prune, seed=seed, diagnostics=s.diagnostics)}
        took = time.perf_counter() - t0
        eval_s += took
        row["eval_s"] = round(took, 3)
        curve.append(row)
        n_evals += 1
        parts = []
        for name in splits.scored:
            part = f"{name} NMI {row[f'{name}_nmi']:.3f} in use {row[f'{name}_in_use']}"
            if "pruned_k" in row:
                part += f", pruned {row[f'{name}_pruned_nmi']:.3f}"
            if f"{name}_kmeans_nmi" in row:
                part += f", k-means {row[f'{name}_kmeans_nmi']:.3f}"
            parts.append(part)
        pruned = f"; pruned K={row['pruned_k']} (on {row['prune_split']})" if "pruned_k" in row else ""
        checks = getattr(recipe, "checks", None)
        check = "; last check " + ", ".join(f"{k} {v:.3g}" for k, v in checks[-1].items() if k != "step") \
            if checks else ""
        console.print(f"  {recipe_name} seed {seed} step {step} ({train_s:.0f}s, eval {took:.0f}s): "
                      f"{'; '.join(parts)}{pruned}{check}")
        if on_progress is not None and not final:
            on_progress({"recipe": recipe_name, "seed": seed, "complete": False, "steps": step,
                         "train_s": round(train_s, 3), "eval_s": round(eval_s, 3), "curve": curve,
                         "recipe_log": recipe.state_dict(), "loadavg_start": load_start, "loadavg_now": loadavg(),
                         "config": cfg.to_dict()})

    def reached() -> bool:
        return s.stop_at_k is not None and curve[-1].get("pruned_k") == s.stop_at_k

    record(final=False)
    t0 = time.perf_counter()
    warmed = recipe.warm_start(WarmStartContext(model, loader.images, device, s.batch_size, seed, console))
    _sync(device)
    train_s += time.perf_counter() - t0  # the warm start is training time
    if warmed:  # show where the warm start left the model (still step 0)
        record(final=False)
    stopped = warmed and reached()
    done = stopped or train_s >= budget_s
    while not done:
        for xb in loader.epoch(epoch):
            t0 = time.perf_counter()
            step_fn(xb, step + 1, recipe.scalars(step))
            step += 1
            recipe.after_step(StepContext(step, epoch, model, opt, loader.images, device, console))
            _sync(device)
            train_s += time.perf_counter() - t0
            done = train_s >= budget_s or (s.max_steps is not None and step >= s.max_steps)
            if done:
                break
            if step % s.eval_every_steps == 0:
                record(final=False)
                stopped = done = reached()
                if done:
                    break
        else:
            epoch += 1
    if not stopped:  # a run stopped by --stop-at-k ends on a pruned evaluation already
        record(final=True)
    else:
        console.print(f"  {recipe_name} seed {seed}: pruning chose K={s.stop_at_k} at step {step} after "
                      f"{train_s:.1f} s of training (evaluation {eval_s:.1f} s besides)")
    if any(r["train_loss"] is not None and not math.isfinite(r["train_loss"]) for r in curve):
        console.print(f"[red]{recipe_name} seed {seed}: the training loss went non-finite[/]")
    final = curve[-1]
    return {
        "recipe": recipe_name, "seed": seed, "complete": True, "active_elements": recipe.active_elements(),
        "steps": step, "epochs_completed": epoch, "train_s": round(train_s, 3), "eval_s": round(eval_s, 3),
        "steps_per_s": round(step / max(train_s, 1e-9), 4),
        "first_reached": first_crossings(curve, list(splits.scored)),
        "stop_at_k": s.stop_at_k,
        "reached_k": ({"train_s": final["train_s"], "step": final["step"], "pruned_k": final["pruned_k"],
                       **{f"{name}_pruned_nmi": final[f"{name}_pruned_nmi"] for name in splits.scored},
                       "eval_s_so_far": round(eval_s, 3)} if stopped else None),
        "final": final,
        "final_prune": {"split": final["prune_split"], "chosen_k": final["pruned_k"],
                        "improved": final["pruned_improved"],
                        **{name: {k: final[f"{name}_pruned_{k}"] for k in ("nmi", "ari", "acc")}
                           for name in splits.scored}},
        "recipe_log": recipe.state_dict(),
        "curve": curve,
        "loadavg_start": load_start, "loadavg_end": loadavg(),
        "config": cfg.to_dict(),
    }


# ----- the benchmark ---------------------------------------------------------------------------------------
def run_convergence(s: ConvergenceSettings, console: Console | None = None) -> Path:
    """Run every (recipe, seed) in turn; returns the JSON path (the plot sits next to it)."""
    console = console or Console()
    device = resolve_device(s.device)
    if s.threads:
        torch.set_num_threads(s.threads)
    splits = load_splits(s, console)
    started = datetime.now(timezone.utc)
    dev_tag = "cuda" if device.type == "cuda" else "cpu"
    stem = f"convergence-{splits.name}-{dev_tag}-w{s.width:g}{'-' + s.tag if s.tag else ''}-" \
           f"{started.strftime('%Y%m%dT%H%M%SZ')}"
    out = Path(s.out_dir) / f"{stem}.json"
    header = {
        "benchmark": "convergence", "dataset": splits.name, "device": device_description(device),
        "device_type": device.type, "threads": torch.get_num_threads() if device.type == "cpu" else None,
        "width": s.width, "reduced": s.width < 1.0, "clusters": s.clusters, "batch_size": s.batch_size,
        "lr": s.lr, "beta": s.beta, "budget_minutes": s.budget_minutes, "eval_every_steps": s.eval_every_steps,
        "max_steps": s.max_steps, "stop_at_k": s.stop_at_k, "n_train": int(splits.train.shape[1]),
        **{f"n_{name}": int(images.shape[1]) for name, (images, _) in splits.scored.items()},
        "n_modalities": int(splits.train.shape[0]), "prune_split": splits.valid_name,
        "score_splits": list(splits.scored),
        "columns": "{split}_{score}: that split's scores; {split}_pruned_{score}: with the set pruning chose on "
                   "prune_split. Choose settings on valid; report test.",
        "torch": torch.__version__, **git_commit(), "started": started.isoformat(timespec="seconds"),
        "x_axis": "training wall time in seconds (steps, recipe hooks, data); evaluation time is in eval_s",
    }
    console.print(f"[bold]bench convergence[/] {splits.name} on {header['device']}, width {s.width:g}, K "
                  f"{s.clusters}, {s.budget_minutes:g} min per run, recipes {s.recipes}, seeds {s.seeds} -> {out}")
    runs = []

    def partial(run: dict) -> None:  # the finished runs and the one under way (complete: False)
        atomic_write_json(out, {**header, "finished": None, "summary": summarise(runs), "runs": [*runs, run]})

    for recipe in s.recipes:
        for seed in s.seeds:
            runs.append(run_one(s, splits, recipe, seed, device, console, on_progress=partial))
            atomic_write_json(out, {**header, "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                                    "summary": summarise(runs), "runs": runs})
            plot(runs, out.with_suffix(".png"), title=f"{splits.name}, {header['device']}, width {s.width:g}",
                 splits=tuple(splits.scored))
    console.print(f"[green]done[/]: {out} and {out.with_suffix('.png')}")
    return out


def summarise(runs: list[dict]) -> list[dict]:
    out = []
    for r in runs:
        f = r["final"]
        names = [k[:-len("_nmi")] for k in f if k.endswith("_nmi") and "_pruned" not in k and "_kmeans" not in k]
        out.append({"recipe": r["recipe"], "seed": r["seed"], "steps": r["steps"], "train_s": r["train_s"],
                    "final_pruned_k": r["final_prune"]["chosen_k"],
                    **{f"final_{n}_nmi": f[f"{n}_nmi"] for n in names},
                    **{f"final_{n}_pruned_nmi": f[f"{n}_pruned_nmi"] for n in names},
                    "first_reached": r["first_reached"], "reached_k": r.get("reached_k")})
    return out


def plot(runs: list[dict], path: Path, title: str = "", splits: tuple[str, ...] = SPLITS) -> None:
    """Per scored split (one row each): NMI (vote over all K: solid; after pruning: dashed markers) against
    training time and steps."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in splits if runs and f"{n}_nmi" in runs[0]["curve"][0]]
    fig, grid = plt.subplots(len(names), 2, figsize=(12, 4.5 * len(names)), sharey=True, squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for axes, name in zip(grid, names, strict=True):
        for i, r in enumerate(runs):
            colour = colours[i % len(colours)]
            label = f"{r['recipe']} seed {r['seed']}"
            for ax, key, scale in ((axes[0], "train_s", 1 / 60), (axes[1], "step", 1)):
                xs = [row[key] * scale for row in r["curve"]]
                ax.plot(xs, [row[f"{name}_nmi"] for row in r["curve"]], color=colour, label=label)
                col = f"{name}_pruned_nmi"
                pruned = [(row[key] * scale, row[col]) for row in r["curve"] if col in row]
                if pruned:
                    ax.plot(*zip(*pruned, strict=True), color=colour, linestyle="--", marker=".", alpha=0.8)
        axes[0].set_xlabel("training wall time (min)")
        axes[1].set_xlabel("steps")
        axes[0].set_ylabel(f"{name} NMI (solid: vote over all K; dashed: after pruning)")
        axes[1].legend(fontsize=8, loc="lower right")
    for ax in grid.flat:
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        for t in THRESHOLDS:
            ax.axhline(t, color="grey", linewidth=0.5, linestyle=":")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
