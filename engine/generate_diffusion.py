"""`cmvae-engine generate RUN_DIR --diffusion`: D-CMVAE sample grids beside the CMVAE's own samples.

Reads the diffusion run (default RUN_DIR/diffusion; its checkpoint holds the frozen CMVAE too) and writes into OUT
(default RUN_DIR/generated): diffusion_unconditional.png (per active cluster by prior mass, a CMVAE row and below
it the same samples denoised), diffusion_conditional_m{s}.png per source modality s (the test inputs, then per
target modality a CMVAE row and the D-CMVAE row), and diffusion.json describing them. On CUDA the denoisers run
compiled under bf16 autocast.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch
from rich.console import Console

from cmvae_engine.cmvae.clustering import to_float
from cmvae_engine.cmvae.diffusion.generation import SAMPLERS, generate, generate_conditional
from cmvae_engine.cmvae.diffusion.model import DCMVAE
from cmvae_engine.cmvae.generation import _spaced, cluster_order
from cmvae_engine.engine.checkpoint import atomic_write_json
from cmvae_engine.engine.diffusion_run import default_out
from cmvae_engine.engine.generate_run import modality_names
from cmvae_engine.engine.images import save_grid
from cmvae_engine.engine.progress import Board
from cmvae_engine.engine.prune_run import load_split
from cmvae_engine.engine.run import load_run
from cmvae_engine.engine.run_info import run_info

MANIFEST = "diffusion.json"
MAX_CLUSTERS = 10


def load_diffusion(run_dir: str | Path, diffusion_dir: str | Path | None, device: torch.device) -> tuple:
    """(LoadedRun of the diffusion stage, its folder)."""
    folder = Path(diffusion_dir) if diffusion_dir is not None else default_out(run_dir)
    if not (folder / "checkpoint.pt").is_file():
        raise FileNotFoundError(f"no diffusion stage at {folder} (no checkpoint.pt). Fix: run `cmvae-engine "
                                f"train-diffusion {run_dir}` first, or pass --diffusion-dir")
    run = load_run(folder, device=device)
    if not isinstance(run.model, DCMVAE):
        raise ValueError(f"{folder} holds a {run.config.model.kind!r} run, not a diffusion stage")
    return run, folder


def sampling_fns(model: DCMVAE, device: torch.device, compiled: bool = True) -> list[Callable] | None:
    """The EMA denoisers as the samplers call them: on CUDA under bf16 autocast and torch.compile (static shapes:
    one graph per batch size); elsewhere None (the plain fp32 modules)."""
    if device.type != "cuda":
        return None
    fns = []
    for net in model.ema:
        def fn(x, t, x_hat, net=net):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return net(x, t, x_hat).float()
        fns.append(torch.compile(fn, dynamic=False) if compiled else fn)
    return fns


def generate_diffusion(run_dir: str | Path, *, diffusion_dir: str | Path | None = None, n: int = 8,
                       sampler: str = "ddim", steps: int = 50, eta: float = 0.0, strength: float = 1.0,
                       seed: int = 0,
                       device: str = "auto", out: str | Path | None = None, data_root: str | Path | None = None,
                       compiled: bool = True, console: Console | None = None) -> dict:
    from cmvae_engine.engine.trainer import resolve_device

    console = console or Console()
    if sampler not in SAMPLERS:
        raise ValueError(f"--sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
    dev = resolve_device(device)
    run, folder = load_diffusion(run_dir, diffusion_dir, dev)
    model: DCMVAE = run.model
    m = model.n_modalities
    names = modality_names(Path(run_dir), m)
    out = Path(out) if out is not None else Path(run_dir) / "generated"
    g = torch.Generator(device=dev)
    g.manual_seed(seed)
    kw = dict(sampler=sampler, steps=min(steps, model.config.timesteps), eta=eta, strength=strength,
              eps_fns=sampling_fns(model, dev, compiled))
    how = f"{sampler.upper()}" + (f" {kw['steps']} steps, eta {eta:g}" if sampler == "ddim" else
                                   f" {model.config.timesteps} steps")
    how += f", strength {strength:g}" if strength < 1 else ""
    order = cluster_order(model.cmvae)[:MAX_CLUSTERS]
    mass = model.cmvae.prior_params()[0].detach().exp().cpu().tolist()
    files: dict[str, dict] = {}
    t0 = time.perf_counter()
    with Board(console) as board:
        rows, labels = [], []
        with board.phase(f"generate --diffusion: {len(order)} clusters x {m} modalities x {n} samples ({how})",
                         total=len(order), done_line=False) as bar:
            for c in order:
                x_hat, refined = generate(model, n, cluster=c, generator=g, **kw)
                rows += [_spaced([x_hat[k][None] for k in range(m)])[0], _spaced([refined[k][None]
                                                                              for k in range(m)])[0]]
                labels += [f"c{c} pi {mass[c]:.3f} CMVAE", f"c{c} D-CMVAE"]
                bar.advance()
        save_grid(out / "diffusion_unconditional.png", torch.stack(rows), row_labels=labels,
                  title=f"per cluster: CMVAE samples, then the same denoised by D-CMVAE ({how}); {n} samples of "
                        f"each modality ({', '.join(names)})")
        files["diffusion_unconditional.png"] = {
            "kind": "unconditional", "clusters": order,
            "caption": f"one pair of rows per active cluster (largest prior mass first, at most {MAX_CLUSTERS}): "
                       f"CMVAE samples (c ~ the cluster, z ~ p(z|c), w ~ p(w)), then the same samples denoised "
                       f"({how}); columns: {n} samples of each modality ({', '.join(names)})"}
        images, _, _, _ = load_split(run.config, "test", data_root)
        x = to_float(images[:, :n].to(dev))
        with board.phase(f"generate --diffusion: conditional grids from {m} source modalities", total=m,
                         done_line=False) as bar:
            for s in range(m):
                x_hat, refined = generate_conditional(model, x[s], s, generator=g, **kw)
                rows, labels = [x[s]], [f"input {names[s]}"]
                for t in range(m):
                    rows += [x_hat[t], refined[t]]
                    labels += [f"{names[t]} CMVAE", f"{names[t]} D-CMVAE"]
                name = f"diffusion_conditional_m{s}.png"
                save_grid(out / name, torch.stack(rows), row_labels=labels,
                          title=f"from {names[s]} ({n} test inputs; w from the prior): CMVAE, then D-CMVAE ({how})")
                files[name] = {"kind": "conditional", "source": s,
                               "caption": f"first row: {names[s]} test inputs; then for each of {', '.join(names)} "
                                          f"the CMVAE's cross-modal samples and the same denoised ({how})"}
                bar.advance()
    manifest = {"diffusion_run": str(folder), "n": n, "seed": seed, "sampler": sampler, "steps": kw["steps"],
                "eta": eta, "strength": strength, "modalities": names, "clusters": order, "files": files,
                "seconds": time.perf_counter() - t0, "run_info": run_info(dev)}
    atomic_write_json(out / MANIFEST, manifest)
    console.print(f"wrote {', '.join(files)} to {out} (D-CMVAE of {folder}, {how})", markup=False)
    return manifest
