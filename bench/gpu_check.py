#!/usr/bin/env python3
"""The GPU acceptance run: everything to measure and check when a GPU is lent, as one prepared command.

    tools/gpu_check.sh                        every stage (install first), results into $OUT or bench/results/
    tools/gpu_check.sh --stage kernels,train  only these (the package is made importable first in any case)
    tools/gpu_check.sh --list                 the stages, what each runs and its time limit
    tools/gpu_check.sh --dry-run              the same stages on the CPU with tiny shapes (about a minute; a test)

Stages, in order (each has its own time limit, at most 6 minutes on an H200, so that a failed one can be rerun
within a short loan; a failed stage does not stop the later ones):

- install      the package without network (`pip install --no-deps --no-build-isolation -e .`, wheels carried in
               $CMVAE_WHEELS or wheels/, else the source folders put on the path) and the C++ extension with its
               CUDA half (tools/build_extension.py --cuda on);
- cuda-tests   `pytest -m cuda tests/test_cuda.py`: every fused op on every CUDA backend against the plain-torch
               reference, opcheck, the compiled step, loss curves with the speed options on and off;
- kernels      `bench kernels --device cuda --training`: the training shapes and the N = 1M mixture;
- train        `bench train polydigits --width 1.0`: the paper's configuration, projected 250-epoch PolyMNIST time;
- profile      `profile` of that optimised step (report.md and its chart);
- convergence  `bench convergence --recipes fast --width 1.0 --stop-at-k 10`: the time until pruning recovers the
               10 clusters.

Every JSON and report goes to $OUT when it is set (a lent machine sends back what is written there, 8 files at
most), else to bench/results/, named as bench/results/ names them; one gpu-check-*.json sums the run up (stage
status, key figures, the targets against what was measured, each stage's log tail). Scratch (data, compiler
caches, the profiler's trace, logs) goes to --work.

The stages themselves (what each runs, the time limits, reading their results) are in bench/gpu_stages.py. Both
files import only the standard library: they run before the package is installed (the stages run the package in
child processes, each under its own time limit).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

if __package__:  # imported as cmvae_engine.bench.gpu_check (the tests)
    from cmvae_engine.bench import gpu_stages as stages
else:  # run as a script, before the package is installed: the file next to this one
    import gpu_stages as stages

ROOT = stages.ROOT
MAX_FILES = 8
"""What a lent machine sends back from $OUT at most; the full run writes 7."""
PAPER_MINUTES_TARGET = 15.0
SPEEDUP_EAGER_TARGET = 5.0
SPEEDUP_COMPILE_TARGET = 1.5
ROOFLINE_TARGET = 0.5
"""Achieved bandwidth at least half the measured copy bandwidth: within 2x of the memory roofline."""
CLUSTERS_TARGET_S = 60.0
DRY_COMPILE_BACKEND = "eager"


# ----- environment, targets, summary ---------------------------------------------------------------------------
_PROBE = r"""
import json, platform, subprocess, torch
d = {"torch": torch.__version__, "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
     "python": platform.python_version()}
if torch.cuda.is_available():
    major, minor = torch.cuda.get_device_capability()
    d.update(device=torch.cuda.get_device_name(), cuda_arch=f"{major}{minor}",
             memory_gb=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1))
else:
    name = platform.processor() or platform.machine()
    try:
        name = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import os
    d["device"] = f"{name} ({os.cpu_count()} cores)"
try:
    import triton
    d["triton"] = triton.__version__
except ImportError:
    d["triton"] = None
for tool, line in (("nvcc", -1), ("cmake", 0)):  # the extension's CUDA build needs nvcc and CMake >= 4
    try:
        text = subprocess.run([tool, "--version"], capture_output=True, text=True, timeout=20).stdout
        d[tool] = text.strip().splitlines()[line]
    except (OSError, subprocess.SubprocessError, IndexError):
        d[tool] = None
print("PROBE " + json.dumps(d))
"""


def probe(ctx: stages.Context) -> dict:
    ran = stages.run_command([ctx.python, "-c", _PROBE], env=ctx.env, timeout_s=120, log=ctx.log_dir / "setup.log")
    line = next((ln for ln in ran.output.splitlines() if ln.startswith("PROBE ")), None)
    if not ran.ok or line is None:
        raise RuntimeError(f"{ctx.python} cannot import torch: {ran.output.strip()[-300:]}")
    return json.loads(line.removeprefix("PROBE "))


def git_commit() -> dict:
    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10,
                                  check=True).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    status = git("status", "--porcelain", "--untracked-files=no")
    # a copy of the tree without its .git (as a lent machine may get) can be told its commit
    head = git("rev-parse", "HEAD") or os.environ.get("CMVAE_COMMIT") or "unknown"
    return {"commit": head, "dirty": None if status is None else bool(status)}


def targets(results: dict[str, stages.StageResult], dry: bool) -> list[dict]:
    """Each target against what was measured (met: None where not measured, or in the dry run)."""
    def value(stage: str, key: str):
        r = results.get(stage)
        return r.values.get(key) if r is not None else None

    rows = [
        ("250-epoch PolyMNIST, projected (min)", f"<= {PAPER_MINUTES_TARGET:g}", value("train", "paper_minutes"),
         lambda v: v <= PAPER_MINUTES_TARGET, ".1f"),
        ("mixture fwd+bwd N=65536 K=40 D=32 vs eager", f">= {SPEEDUP_EAGER_TARGET:g}x", value("kernels", "x_eager"),
         lambda v: v >= SPEEDUP_EAGER_TARGET, ".2f"),
        ("mixture fwd+bwd N=65536 K=40 D=32 vs torch.compile", f">= {SPEEDUP_COMPILE_TARGET:g}x",
         value("kernels", "x_compile"), lambda v: v >= SPEEDUP_COMPILE_TARGET, ".2f"),
        ("mixture fwd+bwd N=1M: achieved / copy bandwidth", f">= {ROOFLINE_TARGET:g} (within 2x)",
         value("kernels", "roofline_fraction"), lambda v: v >= ROOFLINE_TARGET, ".2f"),
        (f"time to K={stages.CLUSTERS} clusters, fast recipe, full width (s)", f"<= {CLUSTERS_TARGET_S:g}",
         value("convergence", "reached_s"), lambda v: v <= CLUSTERS_TARGET_S, ".1f"),
    ]
    return [{"target": name, "goal": goal, "measured": v, "shown": "-" if v is None else format(v, spec),
             "met": None if (v is None or dry) else bool(ok(v))} for name, goal, v, ok, spec in rows]


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def print_summary(summary: dict, results: list[stages.StageResult]) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # the plain form: the same information
        print(f"gpu check on {summary['device']} ({'dry run' if summary['dry_run'] else 'GPU'})")
        for r in results:
            print(f"  {r.name:12s} {r.status:8s} {r.seconds:6.0f} s  {r.figure}")
        for t in summary["targets"]:
            print(f"  {t['target']}: {t['shown']} (goal {t['goal']}, met {t['met']})")
        print(f"files: {summary['out']} ({summary['file_count']})")
        return
    console = Console(width=max(Console().width, 120))
    colour = {"ok": "green", "warn": "yellow", "failed": "red", "timeout": "red", "skipped": "yellow",
              "not run": "dim"}
    kind = "dry run: tiny shapes on the CPU, figures are not targets" if summary["dry_run"] else "GPU acceptance"
    table = Table(title=f"gpu check on {summary['device']} | torch {summary['environment'].get('torch')} | "
                        f"{summary['commit'][:10]} | {kind}")
    for col, justify in (("stage", "left"), ("status", "left"), ("key figure", "left"), ("s", "right")):
        table.add_column(col, justify=justify, overflow="fold")
    for r in results:
        table.add_row(r.name, f"[{colour.get(r.status, 'white')}]{r.status}[/]", r.figure, f"{r.seconds:.0f}")
    console.print(table)
    goals = Table(title="targets")
    for col in ("target", "goal", "measured", "met"):
        goals.add_column(col)
    for t in summary["targets"]:
        met = {True: "[green]yes[/]", False: "[red]no[/]", None: "-"}[t["met"]]
        goals.add_row(t["target"], t["goal"], t["shown"], met)
    console.print(goals)
    console.print(f"{summary['file_count']} files in {summary['out']} (at most {MAX_FILES} come back from a lent "
                  f"machine); logs in {summary['logs']}")



# ----- the command -----------------------------------------------------------------------------------------
def parse_stages(values: list[str] | None) -> list[str]:
    if not values:
        return list(stages.STAGE_NAMES)
    chosen = [v.strip() for text in values for v in text.split(",") if v.strip()]
    bad = [v for v in chosen if v not in stages.STAGE_NAMES]
    if bad or not chosen:
        raise SystemExit(f"gpu_check: unknown stage {', '.join(bad) or '(none)'}; "
                         f"stages: {', '.join(stages.STAGE_NAMES)}")
    return [s for s in stages.STAGE_NAMES if s in chosen]  # always in the stages' own order


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tools/gpu_check.sh", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", action="append", metavar="NAME[,NAME]",
                   help=f"run only these stages (repeatable; {', '.join(stages.STAGE_NAMES)})")
    p.add_argument("--list", action="store_true", help="list the stages and exit")
    p.add_argument("--dry-run", action="store_true",
                   help="every stage on the CPU with tiny shapes (the CUDA tests record their skip)")
    p.add_argument("--out", help="results folder (default: $OUT when set, else bench/results)")
    p.add_argument("--work", help="scratch: data, compiler caches, logs, the profiler trace (default: "
                                  "runs/gpu-check, which git ignores and a warm machine keeps between calls)")
    p.add_argument("--deadline-s", type=float, default=None,
                   help="start no stage later than this many seconds after launch, and cut a running one there")
    p.add_argument("--python", default=sys.executable, help="the interpreter that runs the stages")
    args = p.parse_args(argv)

    if args.list:
        limit = stages.DRY_STAGE_LIMIT_S if args.dry_run else stages.GPU_STAGE_LIMIT_S
        for s in stages.STAGES:
            print(f"{s.name:12s} (<= {limit // 60} min)  {s.what}")
        return 0
    names = parse_stages(args.stage)
    started = time.monotonic()
    out = Path(args.out or os.environ.get("OUT") or ROOT / "bench" / "results").resolve()
    work = Path(args.work or ROOT / "runs" / "gpu-check").resolve()
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    plan = stages.Plan(dry=args.dry_run, work=work, out=out)
    env = dict(os.environ)
    # One compiler cache for every stage: `profile` compiles the graph `bench train` compiled.
    env.setdefault("TORCHINDUCTOR_CACHE_DIR", str(work / "inductor"))
    env.setdefault("TRITON_CACHE_DIR", str(work / "triton"))
    env["PYTHONUNBUFFERED"] = "1"
    env["COLUMNS"] = env.get("COLUMNS", "140")
    if plan.dry:
        # The rehearsal runs the same commands without inductor's cold C++ builds (tens of seconds per graph on
        # two cores): torch.compile captures the whole graph (fullgraph still holds) and runs it with the `eager`
        # backend. Inductor's compiled step itself is tested by tests/test_engine_step.py.
        env.setdefault("TORCH_COMPILE_OVERRIDE_BACKENDS", f">=0:{DRY_COMPILE_BACKEND}")
        env["CMVAE_TEST_THREADS"] = "1"
        # One thread per process: on a shared two-core machine torch's spinning OpenMP workers otherwise slow a
        # tiny step down a hundredfold.
        env.setdefault("OMP_NUM_THREADS", "1")
    ctx = stages.Context(plan, args.python, env, None if args.deadline_s is None else started + args.deadline_s,
                  work / "logs")
    shutil.rmtree(ctx.log_dir, ignore_errors=True)
    before = stages.listing(out)

    print(f"gpu check: stages {', '.join(names)}; results -> {out}; scratch -> {work}", flush=True)
    ctx.probe = probe(ctx)
    if not plan.dry and not ctx.probe.get("cuda_available"):
        print("gpu check: no CUDA device is visible to torch "
              f"(torch {ctx.probe.get('torch')}, CUDA {ctx.probe.get('cuda')}); for the CPU rehearsal pass --dry-run",
              file=sys.stderr)
        return 2
    if "install" not in names:
        try:
            stages.ensure_importable(ctx, None, time.monotonic() + 60, install=False)
            ctx.importable = True
        except RuntimeError as e:
            ctx.setup_error = str(e)
    summary_path = out / f"gpu-check-{stages.slug(ctx.probe.get('device', 'unknown'))}-{stages.stamp()}.json"
    results: dict[str, stages.StageResult] = {}

    def summary() -> dict:
        written = sorted({str(q.relative_to(out)) for q in [*stages.new_files(out, before), summary_path]})
        return {"benchmark": "gpu-check", "dry_run": plan.dry, "device": ctx.probe.get("device"),
                "environment": ctx.probe, **git_commit(), "time": datetime.now(timezone.utc).isoformat(
                    timespec="seconds"), "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
                "stages_requested": names, "stages": [vars(r) for r in results.values()],
                "targets": targets(results, plan.dry), "out": str(out), "logs": str(ctx.log_dir),
                "files": written, "file_count": len(written), "setup_error": ctx.setup_error,
                "seconds": time.monotonic() - started}

    old_handler = signal.signal(signal.SIGTERM, stages.interrupt)  # a stopped run kills its running stage ...
    try:
        _run_stages(ctx, names, results, lambda: write_json(summary_path, summary()))
    except KeyboardInterrupt:  # ... and keeps the summary of the finished ones
        print("gpu check: interrupted; the summary keeps the finished stages", file=sys.stderr)
        write_json(summary_path, summary())
        return 130
    finally:
        signal.signal(signal.SIGTERM, old_handler)
    final = summary()
    write_json(summary_path, final)
    print_summary(final, list(results.values()))
    if final["file_count"] > MAX_FILES:
        print(f"gpu check: {final['file_count']} files written, more than the {MAX_FILES} a lent machine sends back",
              file=sys.stderr)
    return 0 if all(r.status in ("ok", "warn", "skipped") for r in results.values()) else 1


def _run_stages(ctx: stages.Context, names: list[str], results: dict[str, stages.StageResult],
                save: Callable[[], None]) -> None:
    plan = ctx.plan
    for stage in stages.STAGES:
        if stage.name not in names:
            continue
        if plan.dry and stage.name != "install" and not ctx.setup_error and not Path(plan.dataset).is_dir():
            ctx.setup_error = _make_tiny_data(ctx)
        if ctx.setup_error and stage.name != "install":
            results[stage.name] = stages.StageResult(stage.name, "failed", f"setup: {ctx.setup_error}")
            save()
            continue
        print(f"[{stage.name}] {stage.what}", flush=True)
        res = results[stage.name] = stages.run_stage(ctx, stage)
        print(f"[{stage.name}] {res.status} in {res.seconds:.0f} s: {res.figure}", flush=True)
        if res.status in ("failed", "timeout"):
            print("\n".join(f"    {ln}" for ln in res.log_tail.strip().splitlines()[-15:]), flush=True)
        if stage.name == "install" and not ctx.importable:
            # only a package that cannot be imported stops the rest: without the extension's CUDA half the
            # other stages still run (on triton and torch; its tests report the skip)
            ctx.setup_error = "the install stage could not make cmvae_engine importable"
        save()


def _make_tiny_data(ctx: stages.Context) -> str | None:
    """The dry run's data set (64 training tuples, 2 modalities); None on success, else why not."""
    ran = stages.run_command(ctx.cli(ctx.plan.tiny_data_command()), env=ctx.env, timeout_s=120,
                      log=ctx.log_dir / "setup.log")
    return None if ran.ok else f"could not make the dry run's data: {ran.output.strip()[-200:]}"


if __name__ == "__main__":
    sys.exit(main())
