"""`cmvae-engine eval` of an MFCVAE run: every facet against every labelled factor (NMI, ARI, Hungarian ACC and
the many-to-one ACC of the MFCVAE paper), the latent probes per facet (a logistic regression on the posterior
means of z_j for each factor, paper Table 1) and the bound, written to `{run}/eval.json` under `facets` and
`latent_probes`."""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from cmvae_engine.cmvae.clustering import to_float
from cmvae_engine.cmvae.data import read_dataset, resolve_dataset
from cmvae_engine.cmvae.data.format import factor_columns
from cmvae_engine.cmvae.evaluation.latent_probe import subsample
from cmvae_engine.cmvae.mfcvae.evaluation import encode_facets, facet_probes, facet_table
from cmvae_engine.engine.checkpoint import atomic_write_json
from cmvae_engine.engine.progress import Board, format_duration
from cmvae_engine.engine.run import LoadedRun
from cmvae_engine.engine.run_info import run_info

EVAL_JSON = "eval.json"


def run_mfcvae_eval(cfg, run: LoadedRun, ckpt: str, device: torch.device, console: Console) -> dict:
    """cfg: the EvalConfig of engine/eval_run.py (split, clustering, latent, n_latent_train, batch_size, seed,
    data_root); the coherence and FID sections do not apply to a single-modality clustering model."""
    t_start = time.perf_counter()
    run_dir, model, mcfg = Path(cfg.run_dir), run.model, run.config.model
    root = resolve_dataset(run.config.data.dataset, data_root=cfg.data_root or run.config.data.data_root)
    ds = read_dataset(root, mmap=True)
    if ds.n_modalities != 1:
        raise ValueError(f"{root}: {ds.n_modalities} modalities; the MFCVAE in {run_dir / ckpt} was trained on one. "
                         "Pass the data set it was trained on (--data-root)")
    split = ds.split(cfg.split)
    notes = []  # coherence and FID are CMVAE's (cross-modal generation): they do not apply here
    labels = None if split.labels is None else factor_columns(np.asarray(split.labels))
    factors = ds.factors or []
    images = torch.from_numpy(np.array(split.modalities[0]))
    result: dict = {
        "run": str(run_dir), "checkpoint": ckpt, "split": cfg.split, "n": split.n, "dataset": str(root),
        "device": str(device), "seed": cfg.seed, "factors": factors,
        "model": {"kind": mcfg.kind, "n_facets": mcfg.n_facets, "n_clusters": mcfg.n_clusters,
                  "z_dims": mcfg.z_dims, "epoch": run.state.get("epoch"), "step": run.state.get("step")},
        "config": asdict(cfg), "notes": notes, "run_info": run_info(device),
        "acc_note": "acc: one cluster per label (Hungarian); acc_many_to_one: each cluster mapped to its majority "
                    "label (the MFCVAE paper's ACC)",
    }
    timings = {"load_s": time.perf_counter() - t_start}
    console.print(f"[bold]cmvae-engine eval[/] {run_dir} ({ckpt}, mfcvae, {mcfg.n_facets} facets, {cfg.split} split, "
                  f"{split.n} images) on {device}")
    g = torch.Generator(device=device).manual_seed(cfg.seed)
    with Board(console) as board:
        t = time.perf_counter()
        with board.phase(f"bound and facet assignments: encoding {split.n:,} images", done_line=False) as bar:
            ones = torch.ones(mcfg.n_facets, device=device)
            with torch.no_grad():
                total = sum(float(model(to_float(images[s:s + cfg.batch_size].to(device)), ones, ones,
                                        generator=g).bound.sum()) for s in range(0, split.n, cfg.batch_size))
            result["bound"] = total / split.n
            means, assign = encode_facets(model, images, cfg.batch_size, progress=bar)
        if cfg.clustering and labels is not None:
            result["facets"] = facet_table(assign, labels, factors, mcfg.n_clusters)
        elif cfg.clustering:
            notes.append("facet scores skipped: no labels in the split")
        result["used_clusters"] = [int(len(np.unique(a))) for a in assign]
        timings["clustering_s"] = time.perf_counter() - t
        train = ds.splits.get("train")
        if cfg.latent and labels is not None and train is not None and train.labels is not None:
            t = time.perf_counter()
            idx = subsample(train.n, cfg.n_latent_train, np.random.default_rng(cfg.seed))
            with board.phase(f"latent probes: {len(idx):,} train and {split.n:,} {cfg.split} images",
                             done_line=False) as bar:
                tr_means, _ = encode_facets(model, torch.from_numpy(np.array(train.modalities[0][idx])),
                                            cfg.batch_size, progress=bar)
                result["latent_probes"] = facet_probes(tr_means, factor_columns(np.asarray(train.labels))[idx],
                                                       means, labels, factors, n_train=None, seed=cfg.seed)
            timings["latent_s"] = time.perf_counter() - t
        elif cfg.latent:
            notes.append("latent probes skipped: the train and evaluated splits need labels")
    timings["total_s"] = time.perf_counter() - t_start
    result["timings"] = timings
    atomic_write_json(run_dir / EVAL_JSON, result)
    render_mfcvae_eval(result, console)
    console.print(f"wrote {run_dir / EVAL_JSON} in {format_duration(timings['total_s'])}", markup=False)
    return result


def _f(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def render_mfcvae_eval(result: dict, console: Console) -> None:
    console.print(f"bound per image ({result['split']} split): {result['bound']:.2f} nats")
    for row in result.get("facets", []):
        t = Table("factor", "NMI", "ARI", "ACC (Hungarian)", "ACC (many-to-one)",
                  title=f"Facet {row['facet']} ({row['used_clusters']} of {row['n_clusters']} clusters used)")
        for factor, s in row["scores"].items():
            t.add_row(factor, _f(s["nmi"]), _f(s["ari"]), _f(s["acc"]), _f(s["acc_many_to_one"]))
        console.print(t)
    probes = result.get("latent_probes")
    if probes:
        factors = list(probes[0]["accuracy"])
        t = Table("facet", *factors, title="Latent probes (logistic regression on the posterior means of z_j)",
                  caption="chance: " + ", ".join(f"{f} {probes[0]['chance'][f]:.3f}" for f in factors))
        for p in probes:
            t.add_row(str(p["facet"]), *[_f(p["accuracy"][f]) for f in factors])
        console.print(t)
    for note in result.get("notes", []):
        console.print(f"note: {note}", markup=False)
