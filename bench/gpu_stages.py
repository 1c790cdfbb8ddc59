"""The GPU acceptance run's stages (bench/gpu_check.py is the command): what each runs on the GPU or in the CPU
dry run (`Plan`), running a command under a time limit in its own process group, and reading each stage's
results into its key figures.

Only the standard library: this file runs before the package is installed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GPU_STAGE_LIMIT_S = 360
DRY_STAGE_LIMIT_S = 180
MIN_START_S = 30
"""A stage is not started with less than this left before --deadline-s."""
CLUSTERS = 10
"""The clusters of polydigits (and PolyMNIST): `convergence` trains until pruning chooses this many."""
TAIL_CHARS = 4000
"""Of each stage's log, kept in the summary."""


# ----- the plan: what each stage runs, on the GPU or in the CPU dry run --------------------------------------
@dataclass
class Plan:
    """Arguments of every stage's command; `dry` is the CPU rehearsal with tiny shapes."""

    dry: bool
    work: Path
    out: Path

    @property
    def device(self) -> str:
        return "cpu" if self.dry else "cuda"

    @property
    def stage_limit_s(self) -> int:
        return DRY_STAGE_LIMIT_S if self.dry else GPU_STAGE_LIMIT_S

    @property
    def data_root(self) -> Path:
        return self.work / "data"

    @property
    def dataset(self) -> str:
        """`polydigits` (synthesised under the data root on first use) or, dry, a tiny folder made by `setup`."""
        return str(self.data_root / "pd-tiny") if self.dry else "polydigits"

    def tiny_data_command(self) -> list[str]:
        return ["data", "synth", "polydigits", "--out", self.dataset, "--modalities", "2", "--n-train", "64",
                "--n-valid", "16", "--n-test", "32"]

    @property
    def model_flags(self) -> list[str]:
        """Train flags of the timed step: the paper's network at full width, or a tiny one."""
        if self.dry:
            return ["--width", "0.0625", "-k", "4", "--z-dim", "8", "--w-dim", "4", "--batch-size", "16",
                    "--device", "cpu", "--threads", "1"]
        return ["--width", "1.0", "--data-root", str(self.data_root)]

    # the kernel shapes the targets are judged at (dry: the tiny set's mixture, so the same code reads them)
    @property
    def speed_shape(self) -> dict[str, int]:
        return {"N": 64, "K": 5, "D": 4} if self.dry else {"N": 65536, "K": 40, "D": 32}

    @property
    def roofline_shape(self) -> dict[str, int]:
        return {"N": 64, "K": 5, "D": 4} if self.dry else {"N": 1_000_000, "K": 40, "D": 32}

    @property
    def clusters(self) -> int:
        return 2 if self.dry else CLUSTERS

    def kernels_command(self, backends: list[str] | None = None) -> list[str]:
        # dry: the mixture only (each op and backend is timed for a second at least); its numbers are read as
        # the targets' are
        shapes = ["--tiny", "--ops", "mixture_logpdf", "--threads", "1"] if self.dry else ["--training"]
        chosen = ["--backends", ",".join(backends)] if backends else []
        return ["bench", "kernels", "--device", self.device, *shapes, *chosen, "--out", str(self.out)]

    def train_command(self) -> list[str]:
        steps = ["--steps", "2", "--warmup", "1"] if self.dry else ["--steps", "30", "--warmup", "10"]
        return ["bench", "train", self.dataset, *steps, "--out", str(self.out), *self.model_flags]

    def profile_command(self, cuda_graphs: bool = True) -> list[str]:
        # The optimised variant of `bench train`: compiled (+ CUDA graphs on CUDA); AMP, channels_last, fused
        # Adam, the resident loader and kernels `auto` are the defaults on CUDA.
        steps = ["--steps", "2", "--warmup", "1"] if self.dry else ["--steps", "10", "--warmup", "5"]
        # dry: eager (the dry run's `train` already traces the whole step once; a second trace costs ~5 s of CPU)
        step = [] if self.dry else ["--compile"] + (["--cuda-graphs"] if cuda_graphs else [])
        return ["profile", self.dataset, *steps, "--out", str(self.work / "profile"), *step, *self.model_flags]

    def convergence_command(self) -> list[str]:
        common = ["bench", "convergence", self.dataset, "--recipes", "fast", "--seeds", "0", "--prune-every", "1",
                  "--stop-at-k", str(self.clusters), "--out-dir", str(self.out), "--device", self.device]
        if self.dry:
            return [*common, "--width", "0.0625", "-k", "4", "--batch-size", "16", "--max-steps", "2",
                    "--eval-every-steps", "2", "--budget-minutes", "1", "--threads", "1",
                    "--fast-set", "contrast_steps=2,probe_size=16,min_steps=0,check_every=2"]
        # 2 minutes of training judge a 1-minute goal; the evaluations (each with a pruning, not counted as
        # training time) must fit in the stage's limit beside them. Every 200 steps: 1.5 s of training apart at
        # the paper's 250 epochs in 15 minutes (7.7 ms per step; eager steps are slower), at most ~80 evaluations
        return [*common, "--width", "1.0", "--data-root", str(self.data_root), "--budget-minutes", "2",
                "--eval-every-steps", "200"]


# ----- running commands ------------------------------------------------------------------------------------
@dataclass
class Context:
    plan: Plan
    python: str
    env: dict[str, str]
    deadline: float | None
    """time.monotonic() after which no stage starts (and running ones are cut at it)."""
    log_dir: Path
    probe: dict = field(default_factory=dict)
    importable: bool = False
    """cmvae_engine imports from this checkout in the stages' environment."""
    setup_error: str | None = None
    """Why no stage after `install` can run (the package cannot be imported, or the dry run has no data)."""

    def remaining(self) -> float:
        return float("inf") if self.deadline is None else self.deadline - time.monotonic()

    def cli(self, args: list[str]) -> list[str]:
        return [self.python, "-m", "cmvae_engine.engine.cli", *args]


@dataclass
class Ran:
    rc: int | None
    """None: killed at its time limit."""
    seconds: float
    output: str
    cpu_s: float = 0.0
    """CPU time (user + system) of the command's processes that were waited for."""

    @property
    def ok(self) -> bool:
        return self.rc == 0


def run_command(cmd: list[str], *, env: dict[str, str], timeout_s: float, log: Path) -> Ran:
    """Run cmd in its own process group with output to `log` (appended); kill the group at the time limit."""
    log.parent.mkdir(parents=True, exist_ok=True)
    t0, cpu0 = time.monotonic(), _children_cpu()
    with open(log, "a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        start = f.tell()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc: int | None = proc.wait(timeout=max(timeout_s, 1.0))
        except subprocess.TimeoutExpired:
            rc = None
            _kill_group(proc)
        except BaseException:  # interrupted (Ctrl-C, SIGTERM): the child's group runs in its own session
            _kill_group(proc)
            raise
    with open(log) as f:
        f.seek(start)
        output = f.read()
    if rc is None:
        note = f"[killed at its time limit of {timeout_s:.0f} s]\n"
        output += "\n" + note
        with open(log, "a") as f:
            f.write(note)
    return Ran(rc, time.monotonic() - t0, output, _children_cpu() - cpu0)


def _children_cpu() -> float:
    try:
        import resource
    except ImportError:  # not on Unix: not measured
        return 0.0
    use = resource.getrusage(resource.RUSAGE_CHILDREN)
    return use.ru_utime + use.ru_stime


def interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _kill_group(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


# ----- stage results -----------------------------------------------------------------------------------------
@dataclass
class StageResult:
    name: str
    status: str = "ok"
    """ok | warn (ran, with something to look at) | failed | timeout | skipped (cannot run here) | not run."""
    figure: str = ""
    """One line: the stage's key figure."""
    seconds: float = 0.0
    cpu_seconds: float = 0.0
    """CPU time of the stage's commands (user + system)."""
    values: dict = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    """Written under the output folder (relative paths)."""
    commands: list[str] = field(default_factory=list)
    log_tail: str = ""


class StageFailed(Exception):
    """A stage's command failed: `ran` holds its exit status and output."""

    def __init__(self, what: str, ran: Ran):
        super().__init__(what)
        self.ran = ran


def _run_step(ctx: Context, res: StageResult, cmd: list[str], stage_end: float, what: str,
              check: bool = True, env: dict[str, str] | None = None) -> Ran:
    res.commands.append(" ".join(cmd))
    ran = run_command(cmd, env=env or ctx.env, timeout_s=stage_end - time.monotonic(),
                      log=ctx.log_dir / f"{res.name}.log")
    res.log_tail = (res.log_tail + ran.output)[-TAIL_CHARS:]
    res.cpu_seconds += ran.cpu_s
    if check and not ran.ok:
        raise StageFailed(what, ran)
    return ran


def new_files(out: Path, before: set[Path]) -> list[Path]:
    return sorted(p for p in out.rglob("*") if p.is_file() and p not in before)


def listing(out: Path) -> set[Path]:
    return {p for p in out.rglob("*") if p.is_file()} if out.is_dir() else set()


# ----- stages ------------------------------------------------------------------------------------------------
def stage_install(ctx: Context, res: StageResult, end: float) -> None:
    """Install without network (or put the sources on the path) and build the extension (CUDA half on CUDA)."""
    how = ensure_importable(ctx, res, end, install=True)
    ctx.importable = True  # from here on a failure (wheels, the extension) leaves the other stages runnable
    res.values["package"] = how
    wheels = _carried_wheels()
    if wheels:
        # into a folder of their own (on PYTHONPATH, its bin/ on PATH): the machine's Python stays untouched
        site = ctx.plan.work / "site"
        _run_step(ctx, res, [ctx.python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--upgrade",
                             "--target", str(site), *map(str, wheels)], end, "installing the carried wheels")
        ctx.env["PYTHONPATH"] = os.pathsep.join([*filter(None, [ctx.env.get("PYTHONPATH")]), str(site)])
        ctx.env["PATH"] = os.pathsep.join([str(site / "bin"), ctx.env.get("PATH", "")])
        for tool in ("cmake", "ninja"):  # the build takes these over the ones next to the interpreter
            if (site / "bin" / tool).is_file():
                ctx.env[f"CMVAE_{tool.upper()}"] = str(site / "bin" / tool)
    build = [ctx.python, "tools/build_extension.py", "--strict"]
    if not ctx.plan.dry:
        build += ["--cuda", "on", "--cuda-arch", ctx.probe.get("cuda_arch") or "90"]
    ran = _run_step(ctx, res, build, end, "building the C++/CUDA extension")
    line = next((ln for ln in ran.output.splitlines() if ln.startswith("C++ extension built")), "")
    kinds = re.search(r"\(([^;()]+);", line)
    res.values.update({"wheels": [w.name for w in wheels], "extension": line})
    res.figure = f"{how}; extension: {kinds.group(1) if kinds else line or 'built'}"


def _carried_wheels() -> list[Path]:
    folder = Path(os.environ.get("CMVAE_WHEELS") or ROOT / "wheels")
    return sorted(folder.glob("*.whl")) if folder.is_dir() else []


_IMPORT_CHECK = ("import importlib.util, sys; s = importlib.util.find_spec('cmvae_engine.kernels'); "
                 "print(s.origin if s else '')")


def ensure_importable(ctx: Context, res: StageResult | None, end: float, install: bool) -> str:
    """How `cmvae_engine` is found from this folder: already installed from it, installed now (editable, no
    network, no dependencies), or the source folders linked into a path folder under --work (no install)."""
    def origin() -> str:
        ran = run_command([ctx.python, "-c", _IMPORT_CHECK], env=ctx.env, timeout_s=60,
                          log=ctx.log_dir / "setup.log")
        return ran.output.strip().splitlines()[-1] if ran.ok and ran.output.strip() else ""

    def ours(path: str) -> bool:
        return bool(path) and Path(path).resolve().is_relative_to(ROOT)

    if ours(origin()):
        return "package already installed from this folder"
    if install and res is not None:
        ran = _run_step(ctx, res, [ctx.python, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                                   "-e", "."], end, "pip install", check=False)
        if ran.ok and ours(origin()):
            return "installed (pip -e, no network)"
    shim = ctx.plan.work / "pythonpath"
    pkg = shim / "cmvae_engine"
    pkg.mkdir(parents=True, exist_ok=True)
    for name in ("kernels", "cmvae", "engine", "bench"):
        link = pkg / name
        if not link.exists():
            link.symlink_to(ROOT / name, target_is_directory=True)
    ctx.env["PYTHONPATH"] = os.pathsep.join([str(shim), *filter(None, [ctx.env.get("PYTHONPATH")])])
    if not ours(origin()):
        raise RuntimeError("cmvae_engine cannot be imported from this folder, neither installed nor on the path "
                           f"(see {ctx.log_dir / 'setup.log'})")
    return "sources on PYTHONPATH (pip install unavailable)" if install else "sources on PYTHONPATH"


def stage_cuda_tests(ctx: Context, res: StageResult, end: float) -> None:
    junit = ctx.plan.work / "cuda-tests.xml"
    junit.unlink(missing_ok=True)
    # the fp64 CPU references of the op tests use the machine's cores (tests/conftest.py defaults to one thread)
    env = {**ctx.env, "CMVAE_TEST_THREADS": ctx.env.get("CMVAE_TEST_THREADS") or str(os.cpu_count() or 1)}
    # -v: one line per test in the log, which is read when pytest is cut at the limit before its report
    ran = _run_step(ctx, res, [ctx.python, "-m", "pytest", "-m", "cuda", "tests/test_cuda.py", "-v", "-rfEs",
                               "--durations=15", "-p", "no:cacheprovider", f"--junitxml={junit}"], end, "pytest",
                    check=False, env=env)
    counts = read_junit(junit) if junit.is_file() else count_verbose(ran.output)
    if counts is None:
        raise StageFailed("pytest wrote no report", ran)
    res.values.update(counts)
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    res.figure = f"{passed} passed, {counts['failures'] + counts['errors']} failed, {counts['skipped']} skipped"
    if ran.rc is None:
        res.status, res.figure = "timeout", f"cut at the time limit after {res.figure}"
    elif counts["failures"] or counts["errors"] or ran.rc not in (0, 5):
        res.status = "failed"
    elif counts["tests"] and counts["skipped"] == counts["tests"]:
        res.status = "skipped"
        res.figure = "skipped: " + "; ".join(counts["skip_reasons"])
    elif counts["skipped"]:
        res.status = "warn"


def read_junit(path: Path) -> dict:
    """Counts, failing test names with their first message line, and the distinct skip reasons."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    failed, reasons = [], []
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        for tag in ("failure", "error"):
            for el in case.findall(tag):
                message = (el.get("message") or tag).splitlines()[0][:200]
                failed.append(f"{name}: {message}")
        for el in case.findall("skipped"):
            reason = (el.get("message") or "").removeprefix("Skipped: ")
            if reason in ("", "collection skipped"):  # a module-level skip: the reason is in the text,
                text = (el.text or reason).strip()      # "('path', line, 'Skipped: why')"
                reason = text.split("Skipped: ", 1)[1].rstrip("')\"") if "Skipped: " in text else text
            if reason not in reasons:
                reasons.append(reason)
    return {**counts, "failed": failed[:30], "skip_reasons": reasons[:10]}


_VERBOSE_LINE = re.compile(r"^(\S+::\S+) (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)", re.M)


def count_verbose(output: str) -> dict | None:
    """The counts of a `pytest -v` run from its per-test lines (a run cut before it wrote its report)."""
    hits = _VERBOSE_LINE.findall(output)
    if not hits:
        return None
    outcome = [o for _, o in hits]
    return {"tests": len(hits), "failures": outcome.count("FAILED"), "errors": outcome.count("ERROR"),
            "skipped": outcome.count("SKIPPED"), "failed": [n for n, o in hits if o in ("FAILED", "ERROR")][:30],
            "skip_reasons": [], "partial": True}


_MISMATCH = re.compile(r"bench kernels: \S+ \[[^\]]*\] (triton|ext) \S+ disagrees with the reference")
KERNEL_BACKENDS = ("eager", "compile", "triton", "ext")


def stage_kernels(ctx: Context, res: StageResult, end: float) -> None:
    before = listing(ctx.plan.out)
    ran = _run_step(ctx, res, ctx.cli(ctx.plan.kernels_command()), end, "bench kernels", check=False)
    wrong = _MISMATCH.search(" ".join(ran.output.split())) if not ran.ok else None
    if wrong and end - time.monotonic() > 90:
        # a fused backend that disagrees with the reference stops the benchmark; time the others rather than
        # come back without figures (the disagreement is the stage's finding: status warn, and in the values)
        res.status = "warn"
        res.values["disagrees"] = wrong.group(0)
        others = [b for b in KERNEL_BACKENDS if b != wrong.group(1)]
        ran = _run_step(ctx, res, ctx.cli(ctx.plan.kernels_command(others)), end, "bench kernels", check=False)
    if not ran.ok:
        raise StageFailed("bench kernels", ran)
    path = _one(ctx, res, before, "kernels-*.json")
    figures = kernel_figures(json.loads(path.read_text()), ctx.plan.speed_shape, ctx.plan.roofline_shape)
    res.values.update(figures)
    res.figure = (f"mixture fwd+bwd {_x(figures['x_eager'])} eager, {_x(figures['x_compile'])} compile; "
                  f"N=1M at {_pct(figures['roofline_fraction'])} of copy bandwidth")
    if "disagrees" in res.values:
        res.figure = f"{res.values['disagrees']}; without it: {res.figure}"


def kernel_figures(rows: list[dict], speed_shape: dict, roofline_shape: dict) -> dict:
    """Mixture forward+backward: the best fused backend against eager and torch.compile at `speed_shape`, and its
    achieved bandwidth as a fraction of the measured copy bandwidth at `roofline_shape`."""
    def measured(shape: dict) -> dict[str, dict]:
        return {r["backend"]: r for r in rows if r["op"] == "mixture_logpdf" and r["mode"] == "fwd+bwd"
                and r["shape"] == shape and not r.get("skipped") and r.get("median_ms")}

    speed = measured(speed_shape)
    fused = {b: r for b, r in speed.items() if b in ("triton", "ext")}
    best = min(fused, key=lambda b: fused[b]["median_ms"]) if fused else None
    out = {"speed_shape": speed_shape, "roofline_shape": roofline_shape, "best_fused": best,
           "fused_ms": {b: r["median_ms"] for b, r in fused.items()},
           "eager_ms": speed.get("eager", {}).get("median_ms"), "compile_ms": speed.get("compile", {}).get("median_ms"),
           "x_eager": None, "x_compile": None, "roofline_fraction": None, "roofline_backend": None}
    if best is not None:
        ms = fused[best]["median_ms"]
        out["x_eager"] = out["eager_ms"] / ms if out["eager_ms"] else None
        out["x_compile"] = out["compile_ms"] / ms if out["compile_ms"] else None
    roof = {b: r for b, r in measured(roofline_shape).items() if b in ("triton", "ext")}
    if roof:
        b = max(roof, key=lambda k: roof[k]["gbps"])
        out["roofline_fraction"] = roof[b]["gbps"] / roof[b]["peak_gbps"]
        out["roofline_backend"] = b
    return out


def stage_train(ctx: Context, res: StageResult, end: float) -> None:
    before = listing(ctx.plan.out)
    _run_step(ctx, res, ctx.cli(ctx.plan.train_command()), end, "bench train")
    rows = json.loads(_one(ctx, res, before, "train-*.json").read_text())
    figures = train_figures(rows)
    res.values.update(figures)
    res.figure = (f"paper run {_num(figures['paper_minutes'], '.1f')} min projected; "
                  f"{_x(figures['speedup'])} baseline; {_num(figures['samples_per_s'], ',.0f')} samples/s")


def train_figures(rows: list[dict]) -> dict:
    opt = next((r for r in rows if r["variant"] == "optimised"), rows[-1])
    return {"paper_minutes": opt["projected_paper_run_minutes"], "samples_per_s": opt["samples_per_s"],
            "step_ms": opt["step_ms"], "tflops": opt["tflops"], "peak_tflops": opt["peak_tflops"],
            "peak_mem_mb": opt["peak_mem_mb"], "speedup": opt.get("speedup_vs_baseline"),
            "options": opt["options"], "loss_rel_diff": opt.get("loss_rel_diff_vs_baseline")}


_PROFILE_LINE = re.compile(r"step ([\d.]+) ms, ([\d,]+) samples/s, ([\d.e+-]+) TFLOP/s of a measured ([\d.e+-]+)")


def stage_profile(ctx: Context, res: StageResult, end: float) -> None:
    folder = ctx.plan.work / "profile"
    shutil.rmtree(folder, ignore_errors=True)
    ran = _run_step(ctx, res, ctx.cli(ctx.plan.profile_command()), end, "profile", check=ctx.plan.dry)
    if not ran.ok and ran.rc is not None and end - time.monotonic() > 120:
        # CUDA graphs under the profiler are the least tried combination: profile the compiled step without them
        # rather than come back with nothing.
        res.status = "warn"
        res.values["note"] = "failed with CUDA graphs; profiled the compiled step without them"
        ran = _run_step(ctx, res, ctx.cli(ctx.plan.profile_command(cuda_graphs=False)), end, "profile")
    elif not ran.ok:
        raise StageFailed("profile", ran)
    m = _PROFILE_LINE.search(" ".join(ran.output.split()))
    if m:
        res.values.update({"step_ms": float(m.group(1)), "samples_per_s": float(m.group(2).replace(",", "")),
                           "tflops": float(m.group(3)), "peak_tflops": float(m.group(4))})
    stem = f"profile-{slug(ctx.probe.get('device', 'unknown'))}-w{1.0 if not ctx.plan.dry else 0.0625:g}-{stamp()}"
    dest = ctx.plan.out / stem
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("report.md", "phases.png"):  # trace.json stays in --work: too large to send back
        if (folder / name).is_file():
            shutil.copy2(folder / name, dest / name)
            res.files.append(str((dest / name).relative_to(ctx.plan.out)))
    res.values["trace"] = str(folder / "trace.json")
    res.figure = (f"step {_num(res.values.get('step_ms'), '.1f')} ms, {_num(res.values.get('tflops'), '.3g')} "
                  f"TFLOP/s of {_num(res.values.get('peak_tflops'), '.3g')}")


def stage_convergence(ctx: Context, res: StageResult, end: float) -> None:
    before = listing(ctx.plan.out)
    _run_step(ctx, res, ctx.cli(ctx.plan.convergence_command()), end, "bench convergence")
    path = _one(ctx, res, before, "convergence-*.json")
    figures = convergence_figures(json.loads(path.read_text()))
    res.values.update(figures)
    if figures["reached_s"] is None:
        res.status = "warn"
        res.figure = (f"pruning never chose K={figures['stop_at_k']} in {figures['train_s']:.0f} s "
                      f"(last: K={figures['final_pruned_k']})")
    else:
        res.figure = (f"K={figures['stop_at_k']} after {figures['reached_s']:.1f} s of training "
                      f"(step {figures['reached_step']}, pruned NMI {figures['pruned_nmi']:.2f})")


def convergence_figures(d: dict) -> dict:
    run = d["runs"][0]
    reached = run.get("reached_k")
    split = "test" if "test" in d.get("score_splits", ["test"]) else d["score_splits"][0]  # scores to show
    return {"stop_at_k": d.get("stop_at_k"), "reached_s": reached["train_s"] if reached else None,
            "reached_step": reached["step"] if reached else None, "nmi_split": split,
            "pruned_nmi": reached[f"{split}_pruned_nmi"] if reached else run["final_prune"][split]["nmi"],
            "train_s": run["train_s"], "eval_s": run["eval_s"], "steps": run["steps"],
            "final_pruned_k": run["final_prune"]["chosen_k"]}


def _one(ctx: Context, res: StageResult, before: set[Path], pattern: str) -> Path:
    """The stage's new files under the output folder (recorded); the one matching `pattern`."""
    new = new_files(ctx.plan.out, before)
    res.files += [str(p.relative_to(ctx.plan.out)) for p in new]
    match = [p for p in new if p.match(pattern)]
    if not match:
        raise RuntimeError(f"the command succeeded but wrote no {pattern} under {ctx.plan.out}")
    return match[-1]


_ERROR_LINE = re.compile(r"^\s*(?:[\w.]*(?:Error|Exception|Interrupt)\b|error:)")
_BOX = set("─│╭╮╰╯┃━┏┓┗┛═║ ")


def why_it_failed(output: str) -> str:
    """The line that says why: the last exception or `error:` line, else the last line that is not a piece of a
    drawn traceback box."""
    lines = [ln.strip() for ln in output.splitlines() if ln.strip() and not set(ln) <= _BOX]
    errors = [ln for ln in lines if _ERROR_LINE.match(ln)]
    return (errors or lines or [""])[-1]


@dataclass(frozen=True)
class Stage:
    name: str
    what: str
    run: Callable[[Context, StageResult, float], None]


STAGES = (
    Stage("install", "install the package without network; build the C++ extension with its CUDA half", stage_install),
    Stage("cuda-tests", "pytest -m cuda tests/test_cuda.py: ops x backends vs the reference, opcheck, compiled "
                        "step, loss curves", stage_cuda_tests),
    Stage("kernels", "bench kernels --device cuda --training (training shapes, N = 1M mixture)", stage_kernels),
    Stage("train", "bench train polydigits --width 1.0: projected 250-epoch PolyMNIST time", stage_train),
    Stage("profile", "profile of the optimised full-width step: report.md, phases.png", stage_profile),
    Stage("convergence", "bench convergence: fast recipe, full width, until pruning chooses K = 10",
          stage_convergence),
)
STAGE_NAMES = tuple(s.name for s in STAGES)


def run_stage(ctx: Context, stage: Stage) -> StageResult:
    res = StageResult(stage.name)
    left = ctx.remaining()
    if left < MIN_START_S:
        res.status, res.figure = "not run", f"not started: {max(left, 0):.0f} s left before --deadline-s"
        return res
    t0 = time.monotonic()
    end = t0 + min(ctx.plan.stage_limit_s, left)
    try:
        stage.run(ctx, res, end)
    except StageFailed as e:
        res.status = "timeout" if e.ran.rc is None else "failed"
        res.figure = f"{e}: " + ("killed at the time limit" if e.ran.rc is None else
                                  f"exit {e.ran.rc}: {why_it_failed(e.ran.output)[:160]}")
    except Exception as e:  # a stage's own reading of results; recorded, and the next stage still runs
        res.status = "failed"
        res.figure = f"{type(e).__name__}: {e}"[:200]
    res.seconds = time.monotonic() - t0
    return res



def slug(text: str) -> str:
    slug = "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")
    while "--" in slug:
        slug = slug.replace("--", "-")
    return slug[:60]


def stamp() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.0f}%"


def _num(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)
