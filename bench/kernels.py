"""Kernel benchmark: each fused op under torch eager (the reference), torch.compile of the reference, Triton
(CUDA only) and the C++/CUDA extension; forward, backward and both; median with 20/80 percentiles, peak memory
(CUDA) and achieved GB/s of the op's minimal memory traffic against the device's measured copy bandwidth.

Every candidate is checked against the reference before it is timed (a mismatch raises). Timing: on CUDA
`triton.testing.do_bench` per mode (CUDA events when Triton is absent); on CPU a warmed-up loop that times the
forward and the backward of each repetition separately (fwd+bwd is their per-repetition sum), at least 3
repetitions and until 1 s has passed (at most 100).
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch

from cmvae_engine.engine.run_info import cpu_name, git_state
from cmvae_engine.kernels import backends
from cmvae_engine.kernels.image_nll import image_loglik_fused, image_loglik_ref
from cmvae_engine.kernels.importance_weights import importance_weights_fused, importance_weights_ref
from cmvae_engine.kernels.mixture_logpdf import mixture_logpdf_fused, mixture_logpdf_ref
from cmvae_engine.kernels.moe_logq import moe_logq_fused, moe_logq_ref

OPS = ("mixture_logpdf", "moe_logq", "importance_weights", "image_loglik")
BACKENDS = ("eager", "compile", "triton", "ext")
MODES = ("fwd", "bwd", "fwd+bwd")
FP32 = 4  # bytes per element: the benchmark runs fp32, the training path of the probabilistic core


# ----- cases: inputs, the reference and the fused op, minimal traffic ----------------------------------------
@dataclass
class Inputs:
    leaves: list[torch.Tensor]
    """The differentiable inputs."""
    upstream: torch.Tensor
    """Gradient of the output for the backward."""
    target: torch.Tensor | None = None
    """image_loglik's (non-differentiable) target."""


@dataclass(frozen=True)
class Case:
    """One op at one shape. `dims` names the op's sizes (mixture N, K, D; moe M, S, B, D with E = M; weights
    M, S, B; image R, B, P with P = C*H*W)."""

    op: str
    dims: dict[str, int] = field(hash=False)

    def label(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.dims.items())

    # inputs and functions --------------------------------------------------------------------------------
    def inputs(self, device: torch.device, seed: int = 0) -> Inputs:
        """Random inputs in the ranges training sees (lw around the ~-9.5e3 nats of an untrained model)."""
        g = torch.Generator().manual_seed(seed)
        d = self.dims

        def rand(*shape, lo=0.0, hi=1.0):
            return torch.rand(*shape, generator=g) * (hi - lo) + lo

        target = None
        if self.op == "mixture_logpdf":
            n, k, dim = d["N"], d["K"], d["D"]
            leaves = [torch.randn(n, dim, generator=g), rand(k, dim, lo=-1, hi=1), rand(k, dim, lo=0.5, hi=1.5),
                      torch.log_softmax(torch.randn(k, generator=g), 0)]
            out_shape = (n,)
        elif self.op == "moe_logq":
            m, s, b, dim = d["M"], d["S"], d["B"], d["D"]
            leaves = [torch.randn(m, s, b, dim, generator=g), rand(m, b, dim, lo=-1, hi=1),
                      rand(m, b, dim, lo=0.5, hi=1.5)]
            out_shape = (m, s, b)
        elif self.op == "importance_weights":
            m, s, b = d["M"], d["S"], d["B"]
            leaves = [torch.randn(m, s, b, generator=g) * 30 - 9500]
            out_shape = (b,)
        else:
            r, b, p = d["R"], d["B"], d["P"]
            leaves = [rand(r, b, p)]
            target = rand(b, p).to(device)
            out_shape = (r, b)
        return Inputs([t.to(device).requires_grad_() for t in leaves],
                      torch.randn(out_shape, generator=g).to(device), target)

    def reference(self, inp: Inputs) -> Callable[..., torch.Tensor]:
        """The plain-torch reference's differentiable output as a function of the leaves."""
        fn = _reference(self.op)
        return (lambda pred: fn(pred, inp.target)) if self.op == "image_loglik" else fn

    def fused(self, backend: str, inp: Inputs) -> Callable[..., torch.Tensor]:
        if self.op == "mixture_logpdf":
            return lambda z, loc, scale, log_pi: mixture_logpdf_fused(z, loc, scale, log_pi, "laplace", False,
                                                                      backend)[0]
        if self.op == "moe_logq":
            return lambda z, loc, scale: moe_logq_fused(z, loc, scale, "laplace", backend)
        if self.op == "importance_weights":
            return lambda lw: importance_weights_fused(lw, backend)[0]
        # pred [R, B, P] as [R, B, C=P, 1, 1] against target [B, P, 1, 1]: the op's [..., B, C, H, W] layout.
        return lambda pred: image_loglik_fused(pred[..., None, None], inp.target[..., None, None], 0.75, "laplace",
                                               backend)

    # sizes ------------------------------------------------------------------------------------------------
    def traffic_bytes(self, mode: str) -> int:
        """Bytes an ideal implementation moves: each input read once, each output written once."""
        d = self.dims
        if self.op == "mixture_logpdf":
            n, k, dim = d["N"], d["K"], d["D"]
            params = 2 * k * dim + k
            fwd = n * dim + params + n                              # z, loc, scale, log_pi -> logp
            bwd = 2 * n + n * dim + params + n * dim + params       # g, logp, z, params -> g_z, g_params
        elif self.op == "moe_logq":
            m, s, b, dim = d["M"], d["S"], d["B"], d["D"]
            z, params, out = m * s * b * dim, 2 * m * b * dim, m * s * b
            fwd = z + params + out
            bwd = 2 * out + z + params + z + params
        elif self.op == "importance_weights":
            lw, b = d["M"] * d["S"] * d["B"], d["B"]
            fwd = lw + b + 2 * lw                                  # lw -> bound, weights, squared weights
            bwd = b + lw + lw                                      # g, weights -> g_lw
        else:
            r, b, p = d["R"], d["B"], d["P"]
            fwd = r * b * p + b * p + r * b
            bwd = r * b + r * b * p + b * p + r * b * p
        return FP32 * {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]

    def reference_bytes(self) -> int:
        """Rough size of the reference's broadcast intermediates for forward+backward (~6 live copies)."""
        d = self.dims
        elems = {"mixture_logpdf": lambda: d["N"] * d["K"] * d["D"],
                 "moe_logq": lambda: d["M"] ** 2 * d["S"] * d["B"] * d["D"],
                 "importance_weights": lambda: d["M"] * d["S"] * d["B"],
                 "image_loglik": lambda: d["R"] * d["B"] * d["P"]}[self.op]()
        return 6 * FP32 * elems

    def capped(self, max_rows: int = 2048) -> Case:
        """The same op with its row dimension capped: where correctness is checked when the reference cannot
        run at the timed shape."""
        key = {"mixture_logpdf": "N", "moe_logq": "B", "importance_weights": "B", "image_loglik": "B"}[self.op]
        return Case(self.op, {**self.dims, key: min(self.dims[key], max_rows)})


def mixture(n, k, d):
    return Case("mixture_logpdf", {"N": n, "K": k, "D": d})


def moe(m, s, b, d):
    return Case("moe_logq", {"M": m, "S": s, "B": b, "D": d})


def weights(m, s, b):
    return Case("importance_weights", {"M": m, "S": s, "B": b})


def image(r, b, c, h, w):
    return Case("image_loglik", {"R": r, "B": b, "P": c * h * w})


# Training shapes: N = M*S*B with M=5, B=128 (S=1: 640; S=10: 6400); evaluation shapes up to N=1M.
FULL_CASES = (
    [mixture(n, k, d) for n in (640, 6400, 65536, 1_000_000) for k in (10, 40, 256, 1024) for d in (32, 64, 128)]
    + [moe(5, s, 128, d) for s in (1, 10) for d in (32, 64, 128)] + [moe(5, 1, 10_000, 32)]
    + [weights(5, s, 128) for s in (1, 10, 1000)] + [weights(5, 1, 10_000)]
    + [image(5, 128, 3, 28, 28), image(50, 128, 3, 28, 28), image(10, 32, 3, 64, 64)]
)
QUICK_CASES = [mixture(6400, 40, 32), mixture(65536, 40, 32), moe(5, 10, 128, 32), weights(5, 10, 128),
               image(5, 128, 3, 28, 28)]
TINY_CASES = [mixture(64, 5, 4), moe(2, 2, 8, 4), weights(2, 3, 8), image(2, 4, 1, 4, 4)]
# What a PolyMNIST training step at the paper's settings runs (M=5, B=128, K=40, D=32, S=1 and S=10), plus the
# N = 1M mixture of whole-split evaluation, where the memory roofline is judged: the GPU acceptance set.
TRAINING_CASES = [mixture(640, 40, 32), mixture(6400, 40, 32), mixture(65536, 40, 32), mixture(1_000_000, 40, 32),
                  moe(5, 1, 128, 32), moe(5, 10, 128, 32), weights(5, 1, 128), weights(5, 10, 128),
                  image(5, 128, 3, 28, 28), image(50, 128, 3, 28, 28)]


# ----- the device ---------------------------------------------------------------------------------------------
def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()} ({os.cpu_count()} cores)"


def _available_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


def measure_copy_gbps(device: torch.device) -> float:
    """Median bandwidth of a large device copy (read + write), the peak that achieved GB/s is compared to."""
    n = (256 << 20) // FP32 if device.type == "cuda" else (64 << 20) // FP32
    src = torch.ones(n, device=device)
    dst = torch.empty_like(src)
    median_ms = _time_callable(lambda: dst.copy_(src), device)[0]
    return 2 * n * FP32 / (median_ms * 1e-3) / 1e9


def commit() -> tuple[str, bool | None]:
    """(HEAD's hash or 'unknown', whether the working tree had uncommitted changes; None outside git)."""
    head, dirty = git_state()
    return head or "unknown", dirty


# ----- timing ---------------------------------------------------------------------------------------------------
def _percentiles(samples_ms: list[float]) -> tuple[float, float, float]:
    if len(samples_ms) == 1:
        return samples_ms[0], samples_ms[0], samples_ms[0]
    q = statistics.quantiles(samples_ms, n=10, method="inclusive")
    return statistics.median(samples_ms), q[1], q[7]


def _time_callable(fn: Callable[[], object], device: torch.device, grad_to_none=None) -> tuple[float, float, float]:
    """(median, p20, p80) ms of fn on its own."""
    if device.type == "cuda":
        try:
            from triton.testing import do_bench
        except ImportError:
            do_bench = None
        if do_bench is not None:
            return tuple(do_bench(fn, quantiles=[0.5, 0.2, 0.8], grad_to_none=grad_to_none))
        return _percentiles(_cuda_event_samples(fn, grad_to_none))
    fn()
    samples = []
    start = time.perf_counter()
    while len(samples) < 100 and (len(samples) < 3 or time.perf_counter() - start < 1.0):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return _percentiles(samples)


def _cuda_event_samples(fn, grad_to_none, reps: int = 50) -> list[float]:
    fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(reps):
        for t in grad_to_none or ():
            t.grad = None
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        samples.append(start.elapsed_time(end))
    return samples


def time_modes(fwd: Callable[..., torch.Tensor], leaves: list[torch.Tensor], upstream: torch.Tensor,
               device: torch.device) -> tuple[dict[str, tuple[float, float, float]], int]:
    """{mode: (median, p20, p80) ms} and the repetitions behind each figure (CPU; 0 means do_bench's own)."""
    if device.type == "cuda":
        out = fwd(*leaves)
        times = {
            "fwd": _time_callable(lambda: fwd(*leaves), device, leaves),
            "bwd": _time_callable(lambda: out.backward(upstream, retain_graph=True), device, leaves),
            "fwd+bwd": _time_callable(lambda: fwd(*leaves).backward(upstream), device, leaves),
        }
        return times, 0
    f_ms, b_ms = [], []
    start = time.perf_counter()
    while len(f_ms) < 100 and (len(f_ms) < 3 or time.perf_counter() - start < 1.0):
        for t in leaves:
            t.grad = None
        t0 = time.perf_counter()
        out = fwd(*leaves)
        t1 = time.perf_counter()
        out.backward(upstream)
        t2 = time.perf_counter()
        f_ms.append((t1 - t0) * 1e3)
        b_ms.append((t2 - t1) * 1e3)
    both = [a + b for a, b in zip(f_ms, b_ms, strict=True)]
    return {"fwd": _percentiles(f_ms), "bwd": _percentiles(b_ms), "fwd+bwd": _percentiles(both)}, len(f_ms)


def peak_memory_mb(fwd, leaves, upstream, device: torch.device) -> dict[str, float | None]:
    """Peak CUDA memory above what was allocated before, per mode; None on CPU (not measured there)."""
    if device.type != "cuda":
        return dict.fromkeys(MODES)
    result = {}
    for mode in MODES:
        for t in leaves:
            t.grad = None
        out = fwd(*leaves) if mode == "bwd" else None
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        if mode == "fwd":
            fwd(*leaves)
        elif mode == "bwd":
            out.backward(upstream)
        else:
            fwd(*leaves).backward(upstream)
        torch.cuda.synchronize()
        result[mode] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
        del out
    return result


# ----- one case, all backends ------------------------------------------------------------------------------------
def _run_once(fwd: Callable[..., torch.Tensor], inp: Inputs) -> list[torch.Tensor]:
    """Output and input gradients of one forward+backward."""
    for t in inp.leaves:
        t.grad = None
    out = fwd(*inp.leaves)
    out.backward(inp.upstream)
    return [out.detach(), *(t.grad.detach().clone() for t in inp.leaves)]


def check_against_reference(got: list[torch.Tensor], ref: list[torch.Tensor], what: str) -> None:
    """fp32 results against the fp32 reference: max error within 1e-3 of each quantity's scale (a wrong kernel
    is off by O(1) of it; fp32 summation differences stay near 1e-6)."""
    names = ["output"] + [f"grad[{i}]" for i in range(len(ref) - 1)]
    for name, a, b in zip(names, got, ref, strict=True):
        a, b = a.double().cpu(), b.double().cpu()
        scale = max(1.0, b.abs().max().item()) if b.numel() else 1.0
        err = (a - b).abs().max().item() if b.numel() else 0.0
        if not (a.shape == b.shape and math.isfinite(err) and err <= 1e-3 * scale):
            raise RuntimeError(f"bench kernels: {what} {name} disagrees with the reference: max error {err:.3g} "
                               f"(scale {scale:.3g}, shapes {tuple(a.shape)} vs {tuple(b.shape)})")


def _unavailable(backend: str, device: torch.device) -> str:
    if backend == "triton":
        if device.type != "cuda":
            return "Triton runs on CUDA only (the interpreter is for tests, not timing)"
        return backends.triton_unavailable_reason("cuda")
    if backend == "ext":
        reason = backends.ext_unavailable_reason(device.type)
        return f"C++/CUDA extension unavailable: {reason}" if reason else ""
    return ""


def bench_case(case: Case, backend_names: list[str], device: torch.device, compiled: dict) -> list[dict]:
    """Rows (one per backend and mode) for one case; skipped backends get rows with `skipped` set."""
    inp = case.inputs(device)
    ref_fits = case.reference_bytes() <= _available_memory(device) // (2 if device.type == "cuda" else 4)
    reference = _run_once(case.reference(inp), inp) if ref_fits else None
    rows = []
    for backend in backend_names:
        skipped = _unavailable(backend, device)
        if not skipped and backend in ("eager", "compile") and not ref_fits:
            skipped = (f"the reference's broadcast intermediates (~{case.reference_bytes() / 2**30:.0f} GiB) do "
                       f"not fit in memory")
        row_base = {"op": case.op, "backend": backend, "shape": dict(case.dims), "skipped": skipped or None}
        if skipped:
            rows += [{**row_base, "mode": mode, "bytes": case.traffic_bytes(mode), "reps": None,
                      "checked_shape": None} for mode in MODES]
            continue
        fn = _backend_fn(case, backend, inp, compiled)
        got = _run_once(fn, inp)  # the warm-up (and compilation) doubles as the correctness run
        what = f"{case.op} [{case.label()}] {backend}"
        if reference is not None:
            check_against_reference(got, reference, what)
            checked = case.dims
        else:
            small = case.capped()
            small_inp = small.inputs(device)
            check_against_reference(_run_once(_backend_fn(small, backend, small_inp, compiled), small_inp),
                                    _run_once(small.reference(small_inp), small_inp), what)
            checked = small.dims
        times, reps = time_modes(fn, inp.leaves, inp.upstream, device)
        mem = peak_memory_mb(fn, inp.leaves, inp.upstream, device)
        for mode in MODES:
            median, p20, p80 = times[mode]
            rows.append({**row_base, "mode": mode, "median_ms": median, "p20_ms": p20, "p80_ms": p80,
                         "gbps": case.traffic_bytes(mode) / (median * 1e-3) / 1e9, "peak_mem_mb": mem[mode],
                         "bytes": case.traffic_bytes(mode), "reps": reps, "checked_shape": checked})
    return rows


def _backend_fn(case: Case, backend: str, inp: Inputs, compiled: dict) -> Callable[..., torch.Tensor]:
    if backend == "eager":
        return case.reference(inp)
    if backend == "compile":
        # One compiled function per op, static shapes (each new shape recompiles, as a training run compiles
        # its one shape); image_loglik's target is an argument so that it is not baked into the graph.
        if case.op not in compiled:
            compiled[case.op] = torch.compile(_reference(case.op), dynamic=False)
        fn = compiled[case.op]
        return (lambda pred: fn(pred, inp.target)) if case.op == "image_loglik" else fn
    return case.fused(backend, inp)


def _reference(op: str) -> Callable[..., torch.Tensor]:
    """The reference's differentiable output; image_loglik takes (pred, target)."""
    if op == "mixture_logpdf":
        return lambda z, loc, scale, log_pi: mixture_logpdf_ref(z, loc, scale, log_pi, "laplace")[0]
    if op == "moe_logq":
        return lambda z, loc, scale: moe_logq_ref(z, loc, scale, "laplace")
    if op == "importance_weights":
        return lambda lw: importance_weights_ref(lw)[0]
    return lambda pred, target: image_loglik_ref(pred[..., None, None], target[..., None, None], 0.75, "laplace")


# ----- the run ---------------------------------------------------------------------------------------------------
@dataclass
class BenchResult:
    rows: list[dict]
    path: Path


def run(cases: list[Case], backend_names: list[str], device: torch.device, out_dir: Path,
        progress: Callable[[str], None] = lambda msg: None) -> BenchResult:
    """Benchmark every case on every backend; returns the rows (also written as JSON under out_dir)."""
    from cmvae_engine.engine.checkpoint import atomic_write_json

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    peak = measure_copy_gbps(device)
    head, dirty = commit()
    stamp = datetime.now(timezone.utc)
    meta = {"device": device_name(device), "device_type": device.type, "torch": torch.__version__,
            "triton": triton_version, "commit": head, "commit_dirty": dirty,
            "time": stamp.isoformat(timespec="seconds"),
            "dtype": "float32", "threads": torch.get_num_threads() if device.type == "cpu" else None,
            "peak_gbps": peak, "peak_gbps_method": "median large copy (read + write) on this device",
            "peak_mem_method": ("torch.cuda.max_memory_allocated above the inputs" if device.type == "cuda"
                                else "not measured on CPU (null)")}
    compiled: dict = {}
    rows = []
    for case in cases:
        progress(f"{case.op} [{case.label()}]")
        for row in bench_case(case, backend_names, device, compiled):
            rows.append({**meta, **{k: None for k in ("median_ms", "p20_ms", "p80_ms", "gbps", "peak_mem_mb")},
                         **row})
    _add_speedups(rows)
    slug = "".join(c if c.isalnum() else "-" for c in meta["device"]).strip("-").lower()
    while "--" in slug:
        slug = slug.replace("--", "-")
    path = Path(out_dir) / f"kernels-{slug[:60]}-{stamp.strftime('%Y%m%dT%H%M%SZ')}.json"
    atomic_write_json(path, rows)
    return BenchResult(rows, path)


def _add_speedups(rows: list[dict]) -> None:
    eager = {(r["op"], str(r["shape"]), r["mode"]): r["median_ms"] for r in rows if r["backend"] == "eager"}
    for r in rows:
        base = eager.get((r["op"], str(r["shape"]), r["mode"]))
        r["speedup_vs_eager"] = base / r["median_ms"] if base and r["median_ms"] else None


def select_cases(preset: str, ops: list[str]) -> list[Case]:
    table = {"quick": QUICK_CASES, "full": FULL_CASES, "tiny": TINY_CASES, "training": TRAINING_CASES}[preset]
    return [c for c in table if c.op in ops]
