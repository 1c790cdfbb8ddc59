"""`cmvae-engine generate RUN_DIR`: sample grids of a run (pruned.pt when present) as PNG files.

Writes into OUT (default RUN_DIR/generated): unconditional.png (rows: active clusters by prior mass; columns:
n samples per modality), conditional_m{s}.png per source modality s (the source inputs, then each target
modality generated from them), or cluster_{c}.png with --cluster; and generate.json describing the files.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from rich.console import Console

from cmvae_engine.cmvae.clustering import to_float
from cmvae_engine.cmvae.generation import cluster_grid, cluster_order, conditional_grid, unconditional_grid
from cmvae_engine.cmvae.hetero import HeteroCMVAE
from cmvae_engine.engine.checkpoint import atomic_write_json
from cmvae_engine.engine.images import cluster_labels, save_grid
from cmvae_engine.engine.progress import Board
from cmvae_engine.engine.prune_run import load_split, model_checkpoint
from cmvae_engine.engine.run import load_run
from cmvae_engine.engine.run_info import run_info

MANIFEST = "generate.json"


def modality_names(run_dir: Path, m: int) -> list[str]:
    """Names recorded by the trainer in config.json, else m0, m1, ..."""
    try:
        names = json.loads((run_dir / "config.json").read_text())["data"]["modalities"]
        if isinstance(names, list) and len(names) == m:
            return [str(x) for x in names]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return [f"m{i}" for i in range(m)]


def generate_run(run_dir: str | Path, *, n: int = 8, cluster: int | None = None, out: str | Path | None = None,
                 seed: int = 0, device: str = "auto", data_root: str | Path | None = None,
                 console: Console | None = None) -> dict:
    """Write the grids; returns the manifest (also saved as OUT/generate.json)."""
    from cmvae_engine.engine.trainer import resolve_device

    console = console or Console()
    if n < 1:
        raise ValueError(f"--n must be >= 1, got {n}")
    run_dir = Path(run_dir)
    dev = resolve_device(device)
    ckpt = model_checkpoint(run_dir, console)
    run = load_run(run_dir, checkpoint=ckpt, device=dev)
    out = Path(out) if out is not None else run_dir / "generated"
    if run.config.model.kind == "mfcvae":  # per-facet cluster grids and the facet swap (engine/mfcvae_generate.py)
        from cmvae_engine.engine.mfcvae_generate import generate_mfcvae

        return generate_mfcvae(run, ckpt, out, n=n, seed=seed, device=dev, data_root=data_root, console=console)
    model, m = run.model, run.config.model.n_modalities
    names = modality_names(run_dir, m)
    out = Path(out) if out is not None else run_dir / "generated"
    g = torch.Generator(device=dev)
    g.manual_seed(seed)
    order = cluster_order(model)
    mass = model.prior_params()[0].detach().exp().cpu().tolist()
    pruned = ckpt != "checkpoint.pt"
    stage = (f"after pruning ({len(order)} of {model.config.n_clusters} clusters kept)" if pruned
             else "before pruning (no pruned.pt)")
    files: dict[str, dict] = {}
    t0 = time.perf_counter()

    if isinstance(model, HeteroCMVAE):  # images + captions: captions as text beside the tiles
        from cmvae_engine.cmvae.data import resolve_dataset
        from cmvae_engine.engine.hetero_outputs import CaptionView, generate_grids

        if cluster is not None and cluster not in order:
            raise ValueError(f"--cluster {cluster} is not an active cluster of {run_dir / ckpt}. Fix: pass one of "
                             f"the active clusters {', '.join(map(str, sorted(order)))}, or leave --cluster out")
        view = CaptionView.for_data(model, resolve_dataset(run.config.data.dataset,
                                                           data_root=data_root or run.config.data.data_root))
        test = load_split(run.config, "test", data_root)[0] if cluster is None else None
        files = generate_grids(model, view, test, out, g, order, mass, names, n, stage, cluster)
    elif cluster is not None:
        if cluster not in order:
            raise ValueError(f"--cluster {cluster} is not an active cluster of {run_dir / ckpt}. Fix: pass one of "
                             f"the active clusters {', '.join(map(str, sorted(order)))}, or leave --cluster out")
        save_grid(out / f"cluster_{cluster}.png", cluster_grid(model, cluster, n, generator=g), row_labels=names,
                  title=f"cluster {cluster}, prior mass {mass[cluster]:.3f}, {stage}")
        files[f"cluster_{cluster}.png"] = {
            "kind": "cluster", "cluster": cluster,
            "caption": f"cluster {cluster} (prior mass {mass[cluster]:.3f}, {stage}): rows are modalities "
                       f"({', '.join(names)}), columns {n} samples"}
    else:
        with Board(console) as board:
            with board.phase(f"generate: {len(order)} clusters x {m} modalities x {n} samples",
                             done_line=False) as bar:
                grid = unconditional_grid(model, order, n, generator=g, progress=bar)
            save_grid(out / "unconditional.png", grid, row_labels=cluster_labels(order, mass),
                      title=f"{stage}: one row per cluster by prior mass; {n} samples of each modality")
            files["unconditional.png"] = {
                "kind": "unconditional", "clusters": order,
                "caption": f"{stage}: one row per active cluster, labelled with its id and prior mass (largest "
                           f"first: {', '.join(f'c{c} {mass[c]:.3f}' for c in order[:16])}"
                           f"{', ...' if len(order) > 16 else ''}); columns: {n} samples of each modality "
                           f"({', '.join(names)})"}
            images, _, _, _ = load_split(run.config, "test", data_root)
            x = to_float(images[:, :n].to(dev))
            with board.phase(f"generate: cross-modal grids from {m} source modalities", total=m,
                             done_line=False) as bar:
                for s in range(m):
                    name = f"conditional_m{s}.png"
                    save_grid(out / name, conditional_grid(model, x, s, generator=g),
                              row_labels=[f"input {names[s]}"] + names,
                              title=f"from {names[s]} ({n} test inputs; w from the prior)")
                    files[name] = {"kind": "conditional", "source": s,
                                   "caption": f"first row: {names[s]} test inputs; then {', '.join(names)} "
                                              f"generated from them (w from the prior)"}
                    bar.advance()

    manifest = _merge(out / MANIFEST, {"checkpoint": ckpt, "n": n, "seed": seed, "modalities": names,
                                      "clusters": order, "prior_mass": mass, "pruned": pruned, "files": files,
                                      "seconds": time.perf_counter() - t0, "run_info": run_info(dev)})
    atomic_write_json(out / MANIFEST, manifest)
    console.print(f"wrote {', '.join(files)} to {out} (model: {ckpt}, {len(order)} active clusters)", markup=False)
    return manifest


def _merge(path: Path, new: dict) -> dict:
    """Keep earlier entries of the same checkpoint (e.g. a full run, then --cluster); start afresh otherwise."""
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        return new
    same = isinstance(old, dict) and all(old.get(k) == new[k] for k in ("checkpoint", "clusters"))
    if not same:
        return new
    return {**new, "files": {**old.get("files", {}), **new["files"]}}
