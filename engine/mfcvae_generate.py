"""`cmvae-engine generate` on an MFCVAE run: per-facet cluster grids and the facet-swap grid (seed 003, Fig. 5)
in OUT (default RUN_DIR/generated), described in OUT/generate.json like CMVAE's grids."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from cmvae_engine.cmvae.data import read_dataset, resolve_dataset
from cmvae_engine.engine.checkpoint import atomic_write_json
from cmvae_engine.engine.mfcvae_outputs import SWAP, facet_grid_name, write_facet_grids, write_swap_grid
from cmvae_engine.engine.run import LoadedRun
from cmvae_engine.engine.run_info import run_info

MANIFEST = "generate.json"


def generate_mfcvae(run: LoadedRun, ckpt: str, out: Path, *, n: int, seed: int, device: torch.device,
                    data_root: str | Path | None, console: Console) -> dict:
    model = run.model
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator(device=device).manual_seed(seed)
    t0 = time.perf_counter()
    files: dict[str, dict] = {}
    for j, name in enumerate(write_facet_grids(model, out, g, n=n)):
        assert name == facet_grid_name(j)
        files[name] = {"kind": "facet_clusters", "facet": j,
                       "caption": f"facet {j}: one row per cluster (by prior mass, labelled with its id and mass); "
                                  f"in each of the {n} columns the other facets' z are one draw from their priors, so "
                                  f"a row shows what facet {j}'s cluster fixes"}
    root = resolve_dataset(run.config.data.dataset, data_root=data_root or run.config.data.data_root)
    test = read_dataset(root, mmap=True).split("test")
    images = torch.from_numpy(np.array(test.modalities[0][:n]))
    write_swap_grid(model, images, out, n=n)
    top = model.n_facets - 1
    files[SWAP] = {"kind": "facet_swap",
                   "caption": f"facet swap on {images.shape[0]} test images: cell (row i, column k) decodes facet 0 "
                              f"of the row's image with facet {top} of the column's image (posterior means)"}
    manifest = {"checkpoint": ckpt, "n": n, "seed": seed, "kind": "mfcvae", "files": files,
                "prior_mass": [model.priors.params(j)[2].exp().tolist() for j in range(model.n_facets)],
                "seconds": time.perf_counter() - t0, "run_info": run_info(device)}
    atomic_write_json(out / MANIFEST, manifest)
    console.print(f"wrote {', '.join(files)} to {out} (model: {ckpt}, {model.n_facets} facets)", markup=False)
    return manifest
