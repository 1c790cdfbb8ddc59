"""`cmvae-engine profile`: warm-up and N training steps under torch.profiler -> a Chrome trace and a Markdown
report (phases with a chart, top ops, host-device syncs, peak memory, achieved TFLOP/s against a measured peak).

Shared with `bench train`: the model's FLOP count per step, a measured matmul peak, and peak memory.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from torch.profiler import ProfilerActivity, record_function

from cmvae_engine.cmvae.config import ModelConfig
from cmvae_engine.cmvae.networks import macs_per_sample
from cmvae_engine.engine.checkpoint import atomic_write_bytes, atomic_write_text
from cmvae_engine.engine.config import TrainConfig
from cmvae_engine.engine.trainer import Engine, build_engine, data_stream

# Host-side events that make the host wait for the device, and device copies towards the host.
CUDA_SYNC_EVENTS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy")
CPU_READ_OPS = ("aten::_local_scalar_dense",)  # .item(), float(t), bool(t): a device read on a GPU


def step_flops(model: ModelConfig, batch: int, n_samples: int) -> float:
    """Model FLOPs of one training step: 2 FLOPs per MAC, forward + backward ~ 3x forward.

    Forward: every encoder (z and w towers) on its modality, every decoder on every source's S*B latents.
    """
    if getattr(model, "modalities", None) is not None:  # images of other sizes, captions
        from cmvae_engine.engine.hetero_cost import hetero_step_flops

        return hetero_step_flops(model, batch, n_samples)
    macs = macs_per_sample(model.width, model.z_dim, model.w_dim)
    m = model.n_modalities
    fwd = batch * m * (macs["tower_z"] + macs["tower_w"]) + batch * n_samples * m * m * macs["decoder"]
    return 3.0 * 2.0 * fwd


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measured_peak_tflops(device: torch.device, dtype: torch.dtype, seconds: float = 0.5) -> float:
    """Best dense matmul rate on this device at this dtype (TFLOP/s), measured now: the roof the step is held to."""
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    sync(device)
    best, start = float("inf"), time.perf_counter()
    while time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        for _ in range(4):
            a @ b
        sync(device)
        best = min(best, (time.perf_counter() - t0) / 4)
    return 2.0 * n**3 / best / 1e12


def _rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class PeakMemory:
    """Peak memory over a `with` block: CUDA max allocated, or on CPU the process RSS sampled every 10 ms."""

    def __init__(self, device: torch.device):
        self.device, self.peak_mb, self._stop = device, 0.0, threading.Event()
        self.kind = "cuda_max_allocated" if device.type == "cuda" else "process_rss"

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            self.peak_mb = max(self.peak_mb, _rss_mb())

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.peak_mb = _rss_mb()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            self.peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            self._stop.set()
            self._thread.join()
            self.peak_mb = max(self.peak_mb, _rss_mb())


def batches(eng: Engine):
    """Training batches across epoch boundaries, for as long as the caller wants."""
    epoch = 0
    while True:
        yield from data_stream(eng.loader, epoch)
        epoch += 1


@dataclass
class Phase:
    name: str
    host_ms: float
    device_ms: float | None


def _dev_time(evt) -> float:
    return float(getattr(evt, "device_time_total", None) or getattr(evt, "cuda_time_total", 0) or 0)


def _self_dev_time(evt) -> float:
    return float(getattr(evt, "self_device_time_total", None) or getattr(evt, "self_cuda_time_total", 0) or 0)


def _phases(averages, n_mod: int, steps: int, cuda: bool) -> list[Phase]:
    by_name = {e.key: e for e in averages}
    per_step = 1e-3 / steps  # us totals -> ms per step

    def phase(name: str, key: str) -> Phase | None:
        e = by_name.get(key)
        if e is None:
            return None
        return Phase(name, e.cpu_time_total * per_step, _dev_time(e) * per_step if cuda else None)

    out = [phase("data", "data")]
    fwd = phase("forward (total)", "forward")
    groups = [phase(f"encoder m{i}", f"encoder[{i}]") for i in range(n_mod)]
    groups.append(phase("encoders (all towers, grouped)", "encoders (grouped)"))
    groups += [phase(f"decoder group -> m{i}", f"decoder[{i}]") for i in range(n_mod)]
    groups = [g for g in groups if g is not None]
    out.append(fwd)
    out += groups
    if fwd is not None and groups:
        dev = None if not cuda else fwd.device_ms - sum(g.device_ms for g in groups)
        out.append(Phase("objective (sampling, densities, bound; forward minus networks)",
                         fwd.host_ms - sum(g.host_ms for g in groups), dev))
    bwd, opt = phase("backward", "backward"), phase("optimizer", "optimizer")
    if cuda and bwd is not None:
        # The autograd engine runs CUDA backward on its own thread, outside the `backward` range: its kernels
        # are the device time not claimed by the other ranges.
        total = sum(_self_dev_time(e) for e in averages) * per_step
        claimed = sum(p.device_ms for p in (out[0], fwd, opt) if p is not None)
        bwd.device_ms = max(total - claimed, 0.0)
    out += [bwd, opt]
    return [p for p in out if p is not None]


def _inside(evt, name: str) -> bool:
    parent = evt.cpu_parent
    while parent is not None:
        if parent.name == name:
            return True
        parent = parent.cpu_parent
    return False


def count_syncs(events, cuda: bool) -> tuple[int, str]:
    """Syncs outside the optimiser, and a sentence on what was counted (with the optimiser's own reads)."""
    if cuda:
        hits = [e for e in events if e.name in CUDA_SYNC_EVENTS or "Memcpy DtoH" in e.name]
        what = "CUDA runtime synchronisations and device-to-host copies (" + ", ".join(CUDA_SYNC_EVENTS) + \
            ", Memcpy DtoH)"
    else:
        hits = [e for e in events if e.name in CPU_READ_OPS]
        what = "CPU: no device to wait for (n/a); counted instead: .item()-type reads of tensor values " \
               "(aten::_local_scalar_dense), each a host-device sync on a GPU"
    in_opt = sum(1 for e in hits if _inside(e, "optimizer"))
    if in_opt:
        what += f"; not counted: {in_opt} inside the optimiser step (a non-fused Adam reads its per-parameter " \
                "step counters, which live on the host: no device sync)"
    return len(hits) - in_opt, what


def _chart(phases: list[Phase], path: Path, cuda: bool) -> None:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [p.name.split(" (")[0] for p in phases]
    values = [(p.device_ms if cuda and p.device_ms is not None else p.host_ms) for p in phases]
    fig, ax = plt.subplots(figsize=(8, 0.4 * len(phases) + 1.2))
    ax.barh(names[::-1], values[::-1], color="#4c72b0")
    ax.set_xlabel(("device" if cuda else "host") + " time per step (ms)")
    ax.set_title("Training step by phase")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def profile_training(cfg: TrainConfig, *, steps: int, warmup: int, out: Path,
                     console: Console | None = None, top: int = 15) -> dict:
    """Profile `warmup` + `steps` training steps; writes trace.json, report.md, phases.png into `out`."""
    if steps < 1 or warmup < 0:
        raise ValueError(f"--steps must be >= 1 and --warmup >= 0, got {steps} and {warmup}")
    console = console or Console()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    eng = build_engine(cfg, annotate=True)
    device, cuda = eng.device, eng.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    it = batches(eng)
    console.print(f"profiling {warmup} warm-up + {steps} steps on {device}: {eng.opts.describe()}")
    schedule = torch.profiler.schedule(wait=0, warmup=warmup, active=steps, repeat=1)
    with torch.profiler.profile(activities=activities, schedule=schedule) as prof:
        for i in range(warmup + steps):
            if i == warmup:
                sync(device)
                mem = PeakMemory(device).__enter__()
                t0 = time.perf_counter()
            with record_function("data"):
                xb = next(it)
            eng.step(xb, i + 1, eng.recipe.scalars(i))
            prof.step()
        sync(device)
        wall = time.perf_counter() - t0
        mem.__exit__(None, None, None)
    loss = eng.step.stats.loss.item() / max(eng.step.stats.n, 1)  # sync point (after the profiled window)

    trace = out / "trace.json"
    tmp = out / ".trace.json.tmp"
    prof.export_chrome_trace(str(tmp))
    os.replace(tmp, trace)
    averages = prof.key_averages()
    phases = _phases(averages, cfg.model.n_modalities, steps, cuda)
    n_sync, sync_what = count_syncs(prof.events(), cuda)
    step_s = wall / steps
    flops = step_flops(cfg.model, cfg.optim.batch_size, cfg.n_samples)
    achieved = flops / step_s / 1e12
    peak = measured_peak_tflops(device, eng.opts.compute_dtype)
    dev_name = torch.cuda.get_device_name(device) if cuda else f"CPU ({torch.get_num_threads()} threads)"
    _chart(phases, out / "phases.png", cuda)

    names = {p for p in ("data", "forward", "backward", "optimizer", "ProfilerStep")}
    rows = [e for e in averages if not any(e.key.startswith(n) for n in names)
            and not e.key.startswith(("encoder[", "decoder[", "encoders (grouped)"))]
    key = _self_dev_time if cuda else (lambda e: e.self_cpu_time_total)
    rows = sorted(rows, key=key, reverse=True)[:top]
    result = {"device": dev_name, "steps": steps, "warmup": warmup, "step_ms": step_s * 1e3,
              "samples_per_s": cfg.optim.batch_size / step_s, "tflops": achieved, "peak_tflops": peak,
              "peak_mem_mb": mem.peak_mb, "peak_mem_kind": mem.kind, "host_device_syncs": n_sync,
              "syncs_per_step": n_sync / steps, "loss": loss, "trace": str(trace), "report": str(out / "report.md")}
    atomic_write_text(out / "report.md", _report(cfg, eng, result, phases, rows, sync_what, cuda))
    console.print(f"step {result['step_ms']:.1f} ms, {result['samples_per_s']:,.0f} samples/s, "
                  f"{achieved:.3g} TFLOP/s of a measured {peak:.3g} ({100 * achieved / peak:.1f}%), "
                  f"{n_sync} syncs in {steps} steps -> {out / 'report.md'}, {trace}")
    return result


def _report(cfg: TrainConfig, eng: Engine, r: dict, phases: list[Phase], rows, sync_what: str, cuda: bool) -> str:
    c = cfg.model
    dtype = eng.opts.compute_dtype_name
    lines = [
        "# Training-step profile", "",
        f"- device: {r['device']}; torch {torch.__version__}",
        f"- model: width {c.width:g}{' (REDUCED)' if c.reduced else ''}, M={c.n_modalities}, K={c.n_clusters}, "
        f"Dz={c.z_dim}, Dw={c.w_dim}; batch {cfg.optim.batch_size}, {cfg.objective} S={cfg.n_samples}",
        f"- step: {eng.opts.describe()}; loader {cfg.data.loader}; kernels {cfg.kernels}",
        f"- {r['warmup']} warm-up steps, then {r['steps']} profiled steps (mean loss {r['loss']:,.1f})", "",
        "## Throughput", "",
        "| step time | samples/s | achieved TFLOP/s | measured peak TFLOP/s | fraction of peak |",
        "| --- | --- | --- | --- | --- |",
        f"| {r['step_ms']:.2f} ms | {r['samples_per_s']:,.0f} | {r['tflops']:.4g} | {r['peak_tflops']:.4g} "
        f"({dtype} matmul) | {100 * r['tflops'] / r['peak_tflops']:.1f}% |", "",
        "Achieved TFLOP/s counts the model's convolution and linear FLOPs (cmvae.networks.macs_per_sample, 2 FLOPs "
        "per MAC, forward + backward = 3x forward) per measured step time (wall clock over the profiled steps, "
        "profiler overhead included). The peak is the best dense matmul rate measured on this device at the "
        "step's compute dtype, not a data-sheet figure.", "",
        "## Time per phase", "",
        "| phase | host ms/step | device ms/step |", "| --- | --- | --- |",
    ]
    for p in phases:
        dev = f"{p.device_ms:.3f}" if p.device_ms is not None else "n/a (CPU)"
        lines.append(f"| {p.name} | {p.host_ms:.3f} | {dev} |")
    if eng.opts.compile:
        lines += ["", "Compiled: the encoders and decoders are fused into one graph, so there are no per-group "
                  "ranges; the forward total covers them."]
    lines += ["", "![phases](phases.png)", "", f"## Top {len(rows)} ops by self {'device' if cuda else 'CPU'} time",
              "", "| op | calls | self ms/step | total ms/step |", "| --- | --- | --- | --- |"]
    n = r["steps"]
    for e in rows:
        self_t = _self_dev_time(e) if cuda else e.self_cpu_time_total
        tot = _dev_time(e) if cuda else e.cpu_time_total
        lines.append(f"| `{e.key[:80]}` | {e.count // n} | {self_t / n / 1e3:.3f} | {tot / n / 1e3:.3f} |")
    lines += ["", "## Host-device syncs", "",
              f"{r['host_device_syncs']} in {n} steps ({r['syncs_per_step']:.2f} per step): {sync_what}.", "",
              "## Memory", "",
              f"Peak {r['peak_mem_mb']:,.0f} MB ("
              + ("torch.cuda.max_memory_allocated over the profiled steps" if cuda else
                 "resident set size of the whole process, sampled every 10 ms over the profiled steps") + ").",
              "", "Chrome trace: `trace.json` (open in chrome://tracing or ui.perfetto.dev).", ""]
    return "\n".join(lines)
