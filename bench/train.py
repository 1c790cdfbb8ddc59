"""Training-step benchmark: the engine with everything on against everything off, same config, same machine,
one run.

- optimised: torch.compile of model + loss (CUDA graphs on CUDA), bf16 autocast and channels_last on CUDA, fused
  Adam on CUDA, the default per-device decoder and encoder batching (docs/step_cpu.md), the fused-op
  backend `auto`, the `resident` loader.
- baseline: eager fp32 NCHW, plain Adam, one decoder call per (source, target) pair (M*M calls, as the
  reference), the plain-torch ops (kernels.set_backend("torch")), the `files` loader without worker processes
  (the reference never enables its workers), no cudnn.benchmark.

Timing: `warmup` steps (compilation, autotuning, loader start-up), then `steps` steps between two device
synchronisations; the loss is read once after the timed window (no syncs inside it). Each variant runs its
own Engine; the optimised variant must reach the same mean loss as the baseline over the timed steps within a
tolerance (a cheap check that the fast path trains the same model) or the run fails.
"""

from __future__ import annotations

import copy
import math
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from cmvae_engine import kernels
from cmvae_engine.bench.kernels import commit, device_name
from cmvae_engine.engine.checkpoint import atomic_write_json
from cmvae_engine.engine.config import StepConfig, TrainConfig
from cmvae_engine.engine.profiling import PeakMemory, batches, measured_peak_tflops, step_flops, sync
from cmvae_engine.engine.trainer import build_engine

PAPER_EPOCHS, PAPER_TUPLES = 250, 60_000
# Mean loss per tuple over the timed steps, optimised vs baseline: a guard against a fast path that trains
# something else. The compiled step draws its own random numbers (inductor's RNG), so the two differ at the
# sampling-noise level (measured on CPU with differently drawn random numbers: 1.0e-3 at 2 steps of batch 32,
# M=2, width 0.0625; with the same random numbers, via inductor's fallback_random: below 1e-5); bf16 adds its
# rounding.
LOSS_RTOL = {"float32": 1e-2, "bfloat16": 2e-2, "float16": 2e-2}


def variant_config(base: TrainConfig, variant: str) -> TrainConfig:
    cfg = copy.deepcopy(base)
    cfg.eval_every = 0
    cfg.resume = False
    cuda = torch.cuda.is_available() and cfg.device != "cpu"
    if variant == "optimised":
        cfg.step = StepConfig(amp=None, compile=True, cuda_graphs=cuda, channels_last=None, fused_adam=None,
                              decode_per_pair=None, batch_encoders=None)
        cfg.kernels = "auto"
        cfg.data.loader = "resident"
    elif variant == "baseline":
        cfg.step = StepConfig(amp=False, compile=False, cuda_graphs=False, channels_last=False,
                              cudnn_benchmark=False, fused_adam=False, decode_per_pair=True, batch_encoders=False)
        cfg.kernels = "torch"
        cfg.data.loader = "files"
        cfg.data.workers = 0
    else:
        raise ValueError(f"unknown variant {variant!r}")
    return cfg


def run_variant(cfg: TrainConfig, variant: str, *, steps: int, warmup: int) -> dict:
    """Time `steps` training steps of one variant after `warmup` steps; returns its result row."""
    backend_before = kernels.get_backend()
    torch.backends.cudnn.benchmark = False
    try:
        eng = build_engine(cfg)  # sets the kernel backend from cfg.kernels
        device = eng.device
        it = batches(eng)
        for i in range(warmup):
            eng.step(next(it), i + 1, eng.recipe.scalars(i))
        sync(device)
        eng.step.stats.reset()
        with PeakMemory(device) as mem:
            t0 = time.perf_counter()
            for i in range(warmup, warmup + steps):
                eng.step(next(it), i + 1, eng.recipe.scalars(i))
            sync(device)
            wall = time.perf_counter() - t0
        loss = eng.step.stats.loss.item() / eng.step.stats.n  # sync point, after the timed window
        bad = int(eng.step.stats.first_bad.item())
        if bad >= 0 or not math.isfinite(loss):
            raise FloatingPointError(f"bench train: {variant} variant gave a non-finite loss at step {bad}")
        samples = steps * cfg.optim.batch_size
        flops = step_flops(cfg.model, cfg.optim.batch_size, cfg.n_samples) * steps
        dtype = eng.opts.compute_dtype
        peak = measured_peak_tflops(device, dtype)
        rate = samples / wall
        sha, dirty = commit()
        return {
            "benchmark": "train", "variant": variant, "device": device_name(device), "device_type": device.type,
            "threads": torch.get_num_threads() if device.type == "cpu" else None,
            "config": {"dataset": eng.data_info["name"], "n_train": eng.data_info["n"]["train"],
                       "width": cfg.model.width, "reduced": cfg.model.reduced, "batch_size": cfg.optim.batch_size,
                       "n_modalities": cfg.model.n_modalities, "n_clusters": cfg.model.n_clusters,
                       "z_dim": cfg.model.z_dim, "w_dim": cfg.model.w_dim, "objective": cfg.objective,
                       "n_samples": cfg.n_samples},
            "options": eng.opts.describe(), "compute_dtype": eng.opts.compute_dtype_name,
            "kernels": cfg.kernels, "loader": cfg.data.loader + (f" ({cfg.data.workers} workers)"
                                                               if cfg.data.loader == "files" else ""),
            "steps": steps, "warmup": warmup, "seconds": wall,
            "samples_per_s": rate, "steps_per_s": steps / wall, "step_ms": 1e3 * wall / steps,
            "tflops": flops / wall / 1e12, "peak_tflops": peak, "peak_tflops_method": f"measured {dtype} matmul",
            "peak_mem_mb": mem.peak_mb, "peak_mem_method": mem.kind,
            "projected_paper_run_minutes": PAPER_EPOCHS * PAPER_TUPLES / rate / 60,
            "mean_loss": loss, "commit": sha, "commit_dirty": dirty,
            "time": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "torch": torch.__version__,
        }
    finally:
        kernels.set_backend(backend_before)


def bench_train(cfg: TrainConfig, *, steps: int, warmup: int, out_dir: str | Path = "bench/results",
                variants: tuple[str, ...] = ("baseline", "optimised")) -> tuple[Path, list[dict]]:
    """Run the variants and write their rows (plus the speed-up) to one JSON file under out_dir."""
    configs = {v: variant_config(cfg, v) for v in variants}
    if "baseline" in configs and _mixed_shapes(cfg):
        # the `files` loader stacks alike images only: a set of images + captions is read resident by both variants
        configs["baseline"].data.loader = "resident"
    rows = [run_variant(configs[v], v, steps=steps, warmup=warmup) for v in variants]
    by = {r["variant"]: r for r in rows}
    if "baseline" in by and "optimised" in by:
        base, opt = by["baseline"], by["optimised"]
        opt["speedup_vs_baseline"] = opt["samples_per_s"] / base["samples_per_s"]
        tol = LOSS_RTOL[opt["compute_dtype"]]
        rel = abs(opt["mean_loss"] - base["mean_loss"]) / abs(base["mean_loss"])
        opt["loss_rel_diff_vs_baseline"] = rel
        if rel > tol:
            raise AssertionError(f"bench train: optimised mean loss {opt['mean_loss']:.6g} differs from the "
                                 f"baseline's {base['mean_loss']:.6g} by {rel:.2e} (> {tol:g})")
    dev = rows[0]["device"]
    slug = "".join(ch if ch.isalnum() else "-" for ch in dev.lower()).strip("-")
    while "--" in slug:
        slug = slug.replace("--", "-")
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = Path(out_dir) / f"train-{slug[:60]}-w{cfg.model.width:g}-{stamp}.json"
    atomic_write_json(path, rows)
    return path, rows


def _mixed_shapes(cfg: TrainConfig) -> bool:
    """Whether the data set declares modality kinds (images of other sizes, captions)."""
    from cmvae_engine.cmvae.data import resolve_dataset
    from cmvae_engine.cmvae.data.format import read_manifest
    from cmvae_engine.cmvae.data.kinds import SPECS_FIELD

    root = resolve_dataset(cfg.data.dataset, data_root=cfg.data.data_root)
    return SPECS_FIELD in (read_manifest(root) or {})
