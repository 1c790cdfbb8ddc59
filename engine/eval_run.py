"""`cmvae-engine eval`: clustering, coherence, latent probes and FID of a trained run, written to
`{run}/eval.json` (atomically) and shown as tables."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from cmvae_engine.cmvae.data import read_dataset, resolve_dataset
from cmvae_engine.cmvae.data.resolve import KNOWN_NAMES
from cmvae_engine.cmvae.evaluation.classifier import (
    OWN_DIR,
    PRETRAINED_DIR,
    ClassifierSet,
    find_classifiers,
    load_classifier_folder,
    weak_classifiers,
)
from cmvae_engine.cmvae.evaluation.clustering import clustering_evaluation
from cmvae_engine.cmvae.evaluation.coherence import conditional_coherence, unconditional_coherence
from cmvae_engine.cmvae.evaluation.latent_probe import latent_classification, subsample
from cmvae_engine.cmvae.hetero import HeteroCMVAE
from cmvae_engine.engine.checkpoint import atomic_write_json
from cmvae_engine.engine.loaders import stack_modalities
from cmvae_engine.engine.progress import Board, format_duration
from cmvae_engine.engine.run import LoadedRun, load_run
from cmvae_engine.engine.run_info import run_info
from cmvae_engine.engine.trainer import resolve_device

PRUNED = "pruned.pt"
CHECKPOINT = "checkpoint.pt"
EVAL_JSON = "eval.json"


@dataclass
class EvalConfig:
    run_dir: str
    """Run folder written by `cmvae-engine train` (and possibly `prune`)."""
    split: str = "test"
    """Split to evaluate (clustering, conditional coherence, latent-probe test set)."""
    checkpoint: str | None = None
    """Checkpoint file in the run folder; default `pruned.pt` when present, else `checkpoint.pt`."""
    clustering: bool = True
    """Compute NMI/ARI/ACC of the vote and of each modality."""
    coherence: bool = True
    """Compute conditional and unconditional coherence (needs trained digit classifiers)."""
    latent: bool = True
    """Fit linear probes on posterior means of z and w (train split -> evaluated split)."""
    fid: bool = False
    """Compute unconditional and conditional FID (needs the FID Inception weights file)."""
    inception_weights: str | None = None
    """Path of pt_inception-2015-12-05-6726825d.pth; default: searched near the data and in torch's hub cache."""
    n_fid: int = 10000
    """Samples per FID set (reference 10,000); real and conditioning images: the first n_fid of fid_split."""
    fid_split: str | None = None
    """Split of the real and conditioning images for FID; default: `split`."""
    fid_min_samples: int = 2048
    """Refuse FID below this many samples per set (singular covariance); lowered only by tests."""
    classifiers: str | None = None
    """Folder of digit classifiers (ours or the PolyMNIST release); default: searched near the data."""
    n_unconditional: int = 10000
    """Prior samples for unconditional coherence."""
    n_latent_train: int | None = 5000
    """Train tuples the latent probes are fitted on (a random subset; None: all)."""
    batch_size: int = 1000
    """Tuples per forward pass (encoders, decoders, classifiers); Inception uses half of it."""
    device: str = "auto"
    """`auto` (CUDA when present), `cpu`, `cuda`, `cuda:N`."""
    seed: int = 0
    """Seeds every sampling step; each section has its own generator so sections do not affect each other."""
    data_root: str | None = None
    """Folder of named data sets; default: the run's, then $CMVAE_DATA_DIR or ./data."""
    threads: int | None = None
    """CPU threads for torch."""

    def __post_init__(self) -> None:
        for name in ("n_fid", "n_unconditional", "batch_size", "fid_min_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.n_latent_train is not None and self.n_latent_train < 10:
            raise ValueError(f"--n-latent-train must be >= 10, got {self.n_latent_train}")
        if not (self.clustering or self.coherence or self.latent or self.fid):
            raise ValueError("every section is switched off: nothing to evaluate")


def choose_checkpoint(run_dir: Path, name: str | None) -> str:
    if name is not None:
        return name
    return PRUNED if (run_dir / PRUNED).is_file() else CHECKPOINT


def dataset_argument(run: LoadedRun, root: Path, data_root: str | None) -> str:
    """How to name the run's data set on the command line."""
    name = run.config.data.dataset
    if name in KNOWN_NAMES:
        return name + (f" --data-root {data_root}" if data_root else "")
    return str(root.absolute())


def _classifiers(cfg: EvalConfig, run: LoadedRun, root: Path, data_root: str | None,
                 dataset_name: str) -> ClassifierSet:
    m, c = run.config.model.n_modalities, run.config.model.image_channels
    if cfg.classifiers is not None:
        return load_classifier_folder(cfg.classifiers, m, c)
    polymnist = dataset_name.lower() == "polymnist"
    found = find_classifiers(root, m, c, polymnist=polymnist)
    if found is None:
        where = "near the data" if polymnist else "in the data folder"
        raise FileNotFoundError(
            f"no trained digit classifiers for {root} (looked for {PRETRAINED_DIR}/ {where} and for "
            f"{root / OWN_DIR}/); coherence needs one per modality. Train them once with:\n"
            f"  cmvae-engine classifiers train {dataset_argument(run, root, data_root)}\n"
            "or point to them with --classifiers DIR, or evaluate without coherence (--no-coherence)")
    return found


def _generator(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def run_eval(cfg: EvalConfig, console: Console | None = None) -> dict:
    """Evaluate a run as configured; writes `{run}/eval.json` and returns its content."""
    console = console or Console()
    t_start = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    run_dir = Path(cfg.run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"no run folder at {run_dir}; pass the --out folder of `cmvae-engine train`")
    ckpt = choose_checkpoint(run_dir, cfg.checkpoint)
    notes: list[str] = []
    if ckpt == PRUNED and (run_dir / CHECKPOINT).is_file() and \
            (run_dir / CHECKPOINT).stat().st_mtime > (run_dir / PRUNED).stat().st_mtime:
        notes.append(f"{PRUNED} is older than {CHECKPOINT} (training went on after pruning): prune again")
    device = resolve_device(cfg.device)
    run = load_run(run_dir, checkpoint=ckpt, device=device)
    if run.config.model.kind == "mfcvae":  # facets x factors, per-facet probes (engine/mfcvae_eval.py)
        from cmvae_engine.engine.mfcvae_eval import run_mfcvae_eval

        return run_mfcvae_eval(cfg, run, ckpt, device, console)
    model, mcfg = run.model, run.config.model
    data_root = cfg.data_root or run.config.data.data_root
    root = resolve_dataset(run.config.data.dataset, data_root=data_root)
    ds = read_dataset(root, mmap=True)
    if ds.n_modalities != mcfg.n_modalities:
        raise ValueError(f"{root}: {ds.n_modalities} modalities, the model in {run_dir / ckpt} has "
                         f"{mcfg.n_modalities}; pass the data set it was trained on (--data-root)")
    split = ds.split(cfg.split)
    labels = split.labels

    # Every precondition is checked before the first expensive step.
    if cfg.clustering and (labels is None or mcfg.kind != "cmvae"):
        notes.append("clustering skipped: " + ("no labels in the split" if labels is None else
                                               "the model has a single cluster (MMVAE+)"))
    do_clustering = cfg.clustering and labels is not None and mcfg.kind == "cmvae"
    classifiers = _classifiers(cfg, run, root, data_root, ds.name).to(device) if cfg.coherence else None
    train = ds.splits.get("train")
    do_latent = cfg.latent and labels is not None and train is not None and train.labels is not None
    if cfg.latent and not do_latent:
        notes.append("latent classification skipped: the train and evaluated splits need labels")
    fid_net, fid_images, fid_weights = None, None, None
    if cfg.fid:
        from cmvae_engine.cmvae.evaluation import fid as fid_mod  # imports torchvision: only when asked for

        fid_split = ds.split(cfg.fid_split or cfg.split)
        n_real = min(cfg.n_fid, fid_split.n)
        fid_mod.check_sample_count(n_real, f"the {cfg.fid_split or cfg.split} split ({fid_split.n} tuples)",
                                   cfg.fid_min_samples)
        fid_mod.check_sample_count(cfg.n_fid, "generated samples (--n-fid)", cfg.fid_min_samples)
        fid_weights = Path(cfg.inception_weights) if cfg.inception_weights else fid_mod.find_inception_weights(root)
        if fid_weights is None:
            dirs = ", ".join(str(d) for d in fid_mod.inception_weight_dirs(root))
            raise FileNotFoundError(
                f"FID needs the Inception weights file {fid_mod.FID_WEIGHTS_FILE} (shipped in the PolyMNIST zip); "
                f"none in {dirs}. Pass --inception-weights PATH; nothing is downloaded")
        fid_net = fid_mod.load_fid_inception(fid_weights, device)
        fid_images = stack_modalities([m[:n_real] for m in fid_split.modalities])

    images = stack_modalities(split.modalities)
    result: dict = {
        "run": str(run_dir), "checkpoint": ckpt, "split": cfg.split, "n": split.n, "dataset": str(root),
        "modalities": ds.modality_names, "device": str(device), "seed": cfg.seed,
        "model": {"kind": mcfg.kind, "n_clusters": mcfg.n_clusters, "width": mcfg.width, "reduced": mcfg.reduced,
                  "epoch": run.state.get("epoch"), "step": run.state.get("step")},
        "config": asdict(cfg), "notes": notes, "run_info": run_info(device),
    }
    timings = {"load_s": time.perf_counter() - t_start}
    console.print(f"[bold]cmvae-engine eval[/] {run_dir} ({ckpt}, {cfg.split} split, {split.n} tuples) on {device}"
                  + (" [yellow]REDUCED networks[/]" if mcfg.reduced else ""))

    with Board(console) as board:
        if do_clustering:
            t = time.perf_counter()
            with board.phase(f"clustering: encoding {split.n:,} tuples", done_line=False) as bar:
                result["clustering"] = clustering_evaluation(model, images, labels, batch_size=cfg.batch_size,
                                                             generator=_generator(device, cfg.seed), progress=bar)
            timings["clustering_s"] = time.perf_counter() - t
            _section_done(result, "clustering", timings["clustering_s"], console)
        if classifiers is not None:
            t = time.perf_counter()
            coh: dict = {"classifiers": classifiers.describe()}
            warning = weak_classifiers(classifiers.test_accuracy)
            if warning:
                notes.append(warning)
                coh["weak_classifiers"] = warning
                console.print(f"[bold yellow]warning:[/] {escape(warning)}")
            if labels is not None:
                with board.phase(f"coherence: conditional, {mcfg.n_modalities} sources x {split.n:,} tuples",
                                 done_line=False) as bar:
                    coh["conditional"] = conditional_coherence(
                        model, classifiers, images, labels, batch_size=cfg.batch_size,
                        generator=_generator(device, cfg.seed + 1), progress=bar)
            else:
                notes.append("conditional coherence skipped: no labels in the split")
            with board.phase(f"coherence: unconditional, {cfg.n_unconditional:,} prior samples",
                             done_line=False) as bar:
                unc = unconditional_coherence(model, classifiers, cfg.n_unconditional, batch_size=cfg.batch_size,
                                              generator=_generator(device, cfg.seed + 2), progress=bar)
            coh["unconditional"] = unc.pop("coherence")
            coh["unconditional_detail"] = unc
            result["coherence"] = coh
            timings["coherence_s"] = time.perf_counter() - t
            _section_done(result, "coherence", timings["coherence_s"], console)
        if labels is not None and isinstance(model, HeteroCMVAE):
            _caption_naming(model, images, labels, ds, result, timings, board, console, cfg, device)
        if do_latent:
            t = time.perf_counter()
            # Subsample before stacking: the whole PolyMNIST train split is ~706 MB as uint8.
            idx = subsample(train.n, cfg.n_latent_train, np.random.default_rng(cfg.seed))
            with board.phase(f"latent probes: {len(idx):,} train and {split.n:,} {cfg.split} tuples",
                             done_line=False) as bar:
                result["latent_classification"] = latent_classification(
                    model, stack_modalities([m[idx] for m in train.modalities]), train.labels[idx], images, labels,
                    n_train=None, n_test=None, seed=cfg.seed, batch_size=cfg.batch_size, progress=bar)
            timings["latent_s"] = time.perf_counter() - t
            _section_done(result, "latent_classification", timings["latent_s"], console)
        if fid_net is not None:
            t = time.perf_counter()
            with board.phase(f"FID: {mcfg.n_modalities} modalities, {cfg.n_fid:,} samples each",
                             total=2 + mcfg.n_modalities, done_line=False) as bar:
                def log(line: str) -> None:
                    console.print(line, markup=False)
                    bar.advance()

                result["fid"] = fid_mod.fid_scores(
                    model, fid_net, fid_images, n=cfg.n_fid, batch_size=max(1, cfg.batch_size // 2),
                    generator=_generator(device, cfg.seed + 3), min_samples=cfg.fid_min_samples, log=log)
            result["fid"]["weights"] = str(fid_weights)
            result["fid"]["split"] = cfg.fid_split or cfg.split
            timings["fid_s"] = time.perf_counter() - t
            _section_done(result, "fid", timings["fid_s"], console)
    timings["total_s"] = time.perf_counter() - t_start
    result["timings"] = timings
    atomic_write_json(run_dir / EVAL_JSON, result)
    render_notes(result, console)
    console.print(f"wrote {run_dir / EVAL_JSON} in {format_duration(timings['total_s'])}", markup=False)
    return result


def _caption_naming(model, images, labels, ds, result, timings, board, console, cfg, device) -> None:
    """Images + captions whose class names are caption words: how often captions generated from images name the
    right class (cmvae/evaluation/caption_naming.py)."""
    from cmvae_engine.cmvae.evaluation.caption_naming import applicable, caption_naming

    texts = [m for m, s in enumerate(model.specs) if s["kind"] == "text"]
    if not texts or not all(applicable(ds.label_names, ds.vocabs[m]) for m in texts):
        return
    t = time.perf_counter()
    with board.phase("captions generated from images: do they name the class?", done_line=False) as bar:
        result["caption_naming"] = caption_naming(model, images, labels, ds.label_names, ds.vocabs,
                                                  batch_size=cfg.batch_size, generator=_generator(device, cfg.seed + 4),
                                                  progress=bar)
    timings["caption_naming_s"] = time.perf_counter() - t
    cn = result["caption_naming"]
    console.print(f"Captions generated from images that name the right class: {cn['rate']:.3f} ("
                  + ", ".join(f"{k} {v:.3f}" for k, v in cn["pairs"].items()) + f"; {cn['n']} tuples)",
                  markup=False)
    for ex in cn["examples"][:4]:
        console.print(f'  m{ex["source"]} ({ex["label"]}) -> "{ex["caption"]}"', markup=False)


def _section_done(result: dict, key: str, seconds: float, console: Console) -> None:
    """A section's table as soon as it is computed, with its time."""
    render_section(result, key, console)
    console.print(f"({key.replace('_', ' ')}: {format_duration(seconds)})", markup=False, style="dim")


# ----- on screen ---------------------------------------------------------------------------------------


def _f(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def render_eval(result: dict, console: Console) -> None:
    """Tables of every section present in an eval.json dict, then its notes and timings."""
    for key in SECTIONS:
        render_section(result, key, console)
    render_notes(result, console)


SECTIONS = ("clustering", "coherence", "latent_classification", "fid")


def render_section(result: dict, key: str, console: Console) -> None:
    """The table of one section of an eval.json dict (nothing when it is absent)."""
    if key not in result:
        return
    names = result.get("modalities") or []
    label = {f"m{i}": (f"m{i} {n}" if n != f"m{i}" else n) for i, n in enumerate(names)}
    if key == "clustering":
        c = result["clustering"]
        t = Table("assignment", "NMI", "ARI", "ACC", "clusters used",
                  title=f"Clustering ({c['active_clusters']} active clusters)")
        for k, s in [("vote", c["vote"]), *c["per_modality"].items()]:
            t.add_row(label.get(k, k), _f(s["nmi"]), _f(s["ari"]), _f(s["acc"]), str(s["n_clusters"]))
        console.print(t)
    elif key == "coherence":
        coh = result["coherence"]
        clf = coh["classifiers"]
        acc = clf.get("test_accuracy")
        src = f"{clf['kind']} classifiers from {clf['folder']}" + (
            f", test accuracy {', '.join(f'{a:.3f}' for a in acc)}" if acc else "")
        if "conditional" in coh:
            mat = coh["conditional"]["matrix"]
            t = Table("source \\ target", *[f"m{j}" for j in range(len(mat))],
                      title=f"Conditional coherence (average over source != target: "
                            f"{coh['conditional']['average']:.3f}; diagonal: self-reconstructions)", caption=src)
            for i, row in enumerate(mat):
                t.add_row(f"m{i}", *[_f(v) for v in row])
            console.print(t)
        console.print(f"Unconditional coherence: {coh['unconditional']:.3f} "
                      f"({coh['unconditional_detail']['n']} prior samples)")
        if coh.get("weak_classifiers"):
            console.print(f"[bold yellow]warning:[/] {escape(coh['weak_classifiers'])}")
    elif key == "latent_classification":
        lc = result["latent_classification"]
        t = Table("modality", "z accuracy", "w accuracy",
                  title=f"Latent classification (linear probe; {lc['n_train']} train / {lc['n_test']} test, "
                        f"chance {lc['chance']:.3f})")
        for k in [k for k in lc["z"] if k != "mean"] + ["mean"]:
            t.add_row(label.get(k, k), _f(lc["z"][k]), _f(lc["w"][k]))
        console.print(t)
    elif key == "fid":
        fid = result["fid"]
        m_count = len(fid["conditional"]["matrix"])
        t = Table("target", "unconditional", *[f"from m{s}" for s in range(m_count)],
                  title=f"FID (lower is better; {fid['n_unconditional']} samples, {fid['n_real']} real)",
                  caption=f"conditional mean {fid['conditional']['mean']:.2f} (all pairs), "
                          f"{fid['conditional']['mean_cross']:.2f} (source != target)")
        for tgt in range(m_count):
            t.add_row(label.get(f"m{tgt}", f"m{tgt}"), _f(fid["unconditional"][f"m{tgt}"], 2),
                      *[_f(fid["conditional"]["matrix"][s][tgt], 2) for s in range(m_count)])
        t.add_row("mean", _f(fid["unconditional"]["mean"], 2), *[""] * m_count)
        console.print(t)


def render_notes(result: dict, console: Console) -> None:
    for note in result.get("notes", []):
        console.print(f"note: {note}", markup=False)
    tm = result.get("timings", {})
    console.print("time: " + ", ".join(f"{k[:-2]} {format_duration(v)}" for k, v in tm.items()), markup=False)
