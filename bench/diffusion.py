"""D-CMVAE diffusion-stage benchmark: training steps/s of the denoisers (the engine's step: the frozen CMVAE's
reconstructions on the fly, M UNets, Adam) and sampled images/s with DDIM and DDPM.

Speed does not depend on the weights, so the CMVAE is a freshly initialised one of the given width and the data a
fixed random uint8 batch (no run folder needed). Timing: `warmup` untimed iterations, then the timed ones between
device synchronisations. DDPM runs all T steps, each one denoiser call of the same cost: on a CPU the full chain is
minutes per batch, so `ddpm_probe` steps are timed and the T-step rate is projected from them (the JSON says so).
On CUDA the samplers run the denoisers compiled under bf16 autocast (as `generate --diffusion`).
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from cmvae_engine.bench.convergence import git_commit, loadavg
from cmvae_engine.bench.kernels import device_name
from cmvae_engine.cmvae.config import ModelConfig
from cmvae_engine.cmvae.diffusion.config import DiffusionConfig
from cmvae_engine.cmvae.diffusion.model import DCMVAE, to_signed
from cmvae_engine.cmvae.diffusion.sampling import ddim_sample, ddpm_sample
from cmvae_engine.cmvae.diffusion.schedule import Schedule
from cmvae_engine.engine.checkpoint import atomic_write_json
from cmvae_engine.engine.config import StepConfig
from cmvae_engine.engine.generate_diffusion import sampling_fns
from cmvae_engine.engine.profiling import sync
from cmvae_engine.engine.step import TrainStep, build_optimizer, prepare_model, resolve_options
from cmvae_engine.engine.tasks.diffusion_task import DiffusionObjective


def _timed(fn, n: int, warmup: int, device: torch.device) -> float:
    for _ in range(warmup):
        fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / n


def bench_diffusion(*, base: int = 64, n_res: int = 2, modalities: int = 5, width: float = 1.0,
                    batch_size: int = 64, train_steps: int = 10, sample_batch: int = 64, ddim_steps: int = 50,
                    ddpm_probe: int = 20, timesteps: int = 1000, warmup: int = 2, amp: bool | None = None,
                    compile: bool = False, device: str = "auto", out_dir: str | Path = "bench/results") -> tuple:
    from cmvae_engine.engine.trainer import resolve_device

    dev = resolve_device(device)
    torch.manual_seed(0)
    cfg = DiffusionConfig(cmvae=ModelConfig(n_modalities=modalities, n_clusters=10, width=width).to_dict(),
                          base=base, n_res=n_res, timesteps=timesteps, warmup_steps=1)
    model = DCMVAE(cfg).to(dev)
    opts = resolve_options(StepConfig(amp=amp, compile=compile, channels_last=True), dev)
    prepare_model(model, (), opts, dev)
    optimizer = build_optimizer([{"params": list(model.denoisers.parameters()), "lr": 2e-4}], 2e-4, False, opts)
    step = TrainStep(DiffusionObjective(model, opts.amp_dtype), optimizer, opts, dev, fullgraph=False, grad_clip=1.0)
    xb = torch.randint(0, 256, (modalities, batch_size, 3, 28, 28), dtype=torch.uint8, device=dev)
    counter = iter(range(1, 1 << 30))

    def train_once():
        step(xb, next(counter), {})
        model.update_ema()

    t_step = _timed(train_once, train_steps, warmup, dev)
    model.eval()
    fn = (sampling_fns(model, dev) or list(model.ema))[0]
    x_hat = to_signed(torch.rand(sample_batch, 3, 28, 28, device=dev))
    schedule: Schedule = model.schedule
    t_ddim = _timed(lambda: ddim_sample(fn, schedule, x_hat, steps=ddim_steps), 1, 1, dev)
    probe = Schedule(ddpm_probe)  # the same per-step work as a T-step chain: one denoiser call per step
    probe.to(dev)
    t_probe = _timed(lambda: ddpm_sample(fn, probe, x_hat), 1, 1, dev)
    t_ddpm = t_probe / ddpm_probe * timesteps
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    hw = device_name(dev)
    result = {
        "benchmark": "diffusion", "device": hw, "load_average": loadavg(), "torch": torch.__version__,
        **git_commit(), "created": stamp,
        "settings": {"base": base, "n_res": n_res, "modalities": modalities, "cmvae_width": width,
                     "batch_size": batch_size, "sample_batch": sample_batch, "ddim_steps": ddim_steps,
                     "timesteps": timesteps, "step": opts.describe(), "reduced": cfg.reduced},
        "train_steps_per_s": 1.0 / t_step,
        "train_tuples_per_s": batch_size / t_step,
        "ddim_images_per_s": sample_batch / t_ddim,
        "ddpm_images_per_s": sample_batch / t_ddpm,
        "ddpm_note": f"projected from {ddpm_probe} timed ancestral steps to T = {timesteps} (every step is one "
                     "denoiser call of the same shape)",
        "note": "one denoiser per modality; a train step updates all M; sampling rates are per modality's "
                "denoiser (one image = one modality)",
    }
    slug = hw.lower().replace("(", "").replace(")", "").replace(" ", "-")[:40]
    path = Path(out_dir) / f"diffusion-{slug}-b{base}-{stamp}.json"
    atomic_write_json(path, result)
    return path, result
