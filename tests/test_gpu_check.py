"""The GPU acceptance run (bench/gpu_check.py, bench/gpu_stages.py, tools/gpu_check.sh): its CPU dry run end to
end, every stage with tiny shapes, so that the script cannot rot between GPU loans; and the parts that read
results, cut stages at their time limits and keep going past a failure."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cmvae_engine.bench import gpu_check as gc
from cmvae_engine.bench import gpu_stages as gs

ROOT = Path(__file__).resolve().parent.parent


def test_dry_run_runs_every_stage_and_writes_at_most_eight_files(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable}
    res = subprocess.run([str(ROOT / "tools" / "gpu_check.sh"), "--dry-run", "--work", str(work)], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=900)
    shown = res.stdout[-4000:] + res.stderr[-4000:]
    assert res.returncode == 0, shown
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert len(files) <= gc.MAX_FILES, files
    (summary_path,) = out.glob("gpu-check-*.json")
    s = json.loads(summary_path.read_text())
    assert s["dry_run"] is True and s["files"] == files and s["file_count"] == len(files)
    status = {st["name"]: st["status"] for st in s["stages"]}
    assert list(status) == list(gs.STAGE_NAMES)
    # no CUDA here: the CUDA tests are collected and skipped with the module's reason; the rest runs
    assert status["cuda-tests"] == "skipped", s["stages"][1]
    assert {status[k] for k in ("install", "kernels", "train", "profile")} == {"ok"}, shown
    assert status["convergence"] in ("ok", "warn")  # whether 2 tiny steps recover 2 clusters is not the point
    by = {st["name"]: st for st in s["stages"]}
    assert any("needs a CUDA device" in r for r in by["cuda-tests"]["values"]["skip_reasons"])
    # each stage's files, named as bench/results/ names them
    patterns = {"kernels": "kernels-*.json", "train": "train-*-w0.0625-*.json", "convergence": "convergence-*.json"}
    for stage, pattern in patterns.items():
        assert any(Path(f).match(pattern) for f in by[stage]["files"]), (stage, by[stage]["files"])
    assert sorted(Path(f).name for f in by["profile"]["files"]) == ["phases.png", "report.md"]
    report = next(f for f in by["profile"]["files"] if f.endswith("report.md"))
    assert Path(report).parent.name.startswith("profile-") and "## Throughput" in (out / report).read_text()
    # the figures were read from those files
    assert by["train"]["values"]["paper_minutes"] > 0 and by["profile"]["values"]["step_ms"] > 0
    assert by["kernels"]["values"]["x_eager"] > 0 and by["kernels"]["values"]["best_fused"] == "ext"
    assert [t["met"] for t in s["targets"]] == [None] * 5  # the dry run judges nothing
    assert s["environment"]["torch"] and s["device"].endswith("cores)")
    # the one-screen summary
    for word in ("stage", "status", "key figure", "targets", *gs.STAGE_NAMES):
        assert word in res.stdout, word


def test_list_names_every_stage_with_its_limit():
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--list"], capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0
    lines = res.stdout.splitlines()
    assert [ln.split()[0] for ln in lines] == list(gs.STAGE_NAMES)
    assert all("(<= 6 min)" in ln for ln in lines)


def test_stage_selection_keeps_the_stages_order_and_refuses_unknown_names():
    assert gc.parse_stages(["train,kernels"]) == ["kernels", "train"]
    assert gc.parse_stages(["profile", "install"]) == ["install", "profile"]
    assert gc.parse_stages(None) == list(gs.STAGE_NAMES)
    with pytest.raises(SystemExit, match="unknown stage bench"):
        gc.parse_stages(["kernels,bench"])


def test_every_stage_is_bounded_to_six_minutes():
    plan = gs.Plan(dry=False, work=Path("/w"), out=Path("/o"))
    assert plan.stage_limit_s <= 360 and gs.DRY_STAGE_LIMIT_S <= 360
    assert "--training" in plan.kernels_command() and "--device" in plan.kernels_command()
    assert plan.train_command()[:3] == ["bench", "train", "polydigits"] and "1.0" in plan.train_command()
    conv = plan.convergence_command()
    assert conv[conv.index("--stop-at-k") + 1] == "10" and conv[conv.index("--width") + 1] == "1.0"
    assert "--cuda-graphs" in plan.profile_command() and "--cuda-graphs" not in plan.profile_command(False)


def test_a_command_past_its_limit_is_killed(tmp_path):
    t0 = time.monotonic()
    ran = gs.run_command([sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"],
                         env=dict(os.environ), timeout_s=2, log=tmp_path / "x.log")
    assert ran.rc is None and not ran.ok and time.monotonic() - t0 < 30
    assert "started" in ran.output and "killed at its time limit" in (tmp_path / "x.log").read_text()


def _ctx(tmp_path, deadline=None) -> gs.Context:
    return gs.Context(gs.Plan(dry=True, work=tmp_path, out=tmp_path / "out"), sys.executable, dict(os.environ),
                      deadline, tmp_path / "logs")


def test_a_failed_stage_is_recorded_and_the_deadline_stops_new_ones(tmp_path):
    def failing(ctx, res, end):
        gs._run_step(ctx, res, [sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"], end, "the step")

    res = gs.run_stage(_ctx(tmp_path), gs.Stage("bad", "fails", failing))
    assert res.status == "failed" and "exit 3" in res.figure and "boom" in res.figure and "boom" in res.log_tail
    late = gs.run_stage(_ctx(tmp_path, deadline=time.monotonic() + 5), gs.Stage("late", "never", failing))
    assert late.status == "not run" and "deadline" in late.figure

    def broken_reader(ctx, res, end):
        raise KeyError("median_ms")

    res = gs.run_stage(_ctx(tmp_path), gs.Stage("reader", "reads", broken_reader))
    assert res.status == "failed" and "KeyError" in res.figure


def _row(backend, shape, ms, gbps=None, peak=100.0, mode="fwd+bwd", skipped=None):
    return {"op": "mixture_logpdf", "backend": backend, "mode": mode, "shape": shape, "median_ms": ms,
            "gbps": gbps, "peak_gbps": peak, "skipped": skipped}


def test_kernel_figures_take_the_best_fused_backend():
    speed, roof = {"N": 65536, "K": 40, "D": 32}, {"N": 1_000_000, "K": 40, "D": 32}
    rows = [_row("eager", speed, 10.0), _row("compile", speed, 3.0), _row("triton", speed, 1.25),
            _row("ext", speed, 2.0), _row("triton", speed, 0.1, mode="fwd"),
            _row("triton", roof, 5.0, gbps=40.0), _row("ext", roof, 4.0, gbps=60.0),
            _row("eager", roof, None, skipped="does not fit")]
    f = gs.kernel_figures(rows, speed, roof)
    assert f["best_fused"] == "triton" and f["x_eager"] == pytest.approx(8.0) and f["x_compile"] == pytest.approx(2.4)
    assert f["roofline_backend"] == "ext" and f["roofline_fraction"] == pytest.approx(0.6)
    none = gs.kernel_figures([_row("eager", speed, 10.0), _row("triton", speed, None, skipped="no triton")], speed,
                             roof)
    assert none["best_fused"] is None and none["x_eager"] is None and none["roofline_fraction"] is None


def test_targets_are_judged_only_on_the_gpu():
    res = {"train": gs.StageResult("train", values={"paper_minutes": 12.0}),
           "kernels": gs.StageResult("kernels", values={"x_eager": 4.0, "x_compile": 1.6, "roofline_fraction": 0.7}),
           "convergence": gs.StageResult("convergence", values={"reached_s": None})}
    met = [t["met"] for t in gc.targets(res, dry=False)]
    assert met == [True, False, True, True, None]
    assert [t["met"] for t in gc.targets(res, dry=True)] == [None] * 5


def test_junit_counts_failures_and_skip_reasons(tmp_path):
    xml = tmp_path / "r.xml"
    xml.write_text(
        '<testsuites><testsuite name="pytest" tests="4" failures="1" errors="0" skipped="2">'
        '<testcase classname="tests.test_cuda" name="test_a"/>'
        '<testcase classname="tests.test_cuda" name="test_b"><failure message="AssertionError: off by 1&#10;more"/>'
        '</testcase><testcase classname="tests.test_cuda" name="test_c"><skipped message="ext on CUDA: not built"/>'
        '</testcase><testcase classname="tests.test_cuda" name="test_d"><skipped message="ext on CUDA: not built"/>'
        '</testcase></testsuite></testsuites>')
    got = gs.read_junit(xml)
    assert (got["tests"], got["failures"], got["errors"], got["skipped"]) == (4, 1, 0, 2)
    assert got["failed"] == ["tests.test_cuda::test_b: AssertionError: off by 1"]
    assert got["skip_reasons"] == ["ext on CUDA: not built"]


def test_the_run_goes_on_past_failed_stages(tmp_path, monkeypatch, capsys):
    """An install whose extension build fails still leaves the package importable: the later stages run; a
    stage cut at its limit is a timeout; the exit status says something failed."""
    ran = []

    def install(ctx, res, end):
        ctx.importable = True
        raise RuntimeError("no CMake >= 4")

    def kernels(ctx, res, end):
        ran.append("kernels")
        res.figure = "measured"

    def train(ctx, res, end):
        raise gs.StageFailed("bench train", gs.Ran(None, 1.0, "step 1\n"))

    monkeypatch.setattr(gs, "STAGES", (gs.Stage("install", "i", install), gs.Stage("kernels", "k", kernels),
                                       gs.Stage("train", "t", train)))
    work, out = tmp_path / "work", tmp_path / "out"
    (work / "data" / "pd-tiny").mkdir(parents=True)  # the dry run's data, so that none is made
    rc = gc.main(["--dry-run", "--stage", "train,install,kernels", "--out", str(out), "--work", str(work)])
    assert rc == 1 and ran == ["kernels"]
    (path,) = out.glob("gpu-check-*.json")
    s = json.loads(path.read_text())
    assert [(st["name"], st["status"]) for st in s["stages"]] == [("install", "failed"), ("kernels", "ok"),
                                                                   ("train", "timeout")]
    assert "no CMake" in s["stages"][0]["figure"] and "killed at the time limit" in s["stages"][2]["figure"]
    assert s["files"] == [path.name] and "targets" in capsys.readouterr().out


def test_a_pytest_run_cut_short_is_counted_from_its_lines():
    out = ("tests/test_cuda.py::test_a[triton] PASSED   [  1%]\n"
           "tests/test_cuda.py::test_a[ext] FAILED      [  2%]\n"
           "tests/test_cuda.py::test_b SKIPPED (ext on CUDA: not built) [  3%]\n"
           "tests/test_cuda.py::test_c PASSED [  4%]\n[killed at its time limit of 360 s]\n")
    got = gs.count_verbose(out)
    assert (got["tests"], got["failures"], got["skipped"], got["partial"]) == (4, 1, 1, True)
    assert got["failed"] == ["tests/test_cuda.py::test_a[ext]"]
    assert gs.count_verbose("collected 0 items\n") is None


def test_the_build_takes_the_cmake_it_is_pointed_at(tmp_path, monkeypatch):
    """A carried cmake wheel (CMake >= 4 for the C++20 CUDA dialect) wins over the machine's older one."""
    from cmvae_engine.kernels import extension_build

    fake = tmp_path / "bin" / "cmake"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho 'cmake version 4.1.0'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CMVAE_CMAKE", str(fake))
    assert extension_build._tool("cmake") == str(fake)
    monkeypatch.delenv("CMVAE_CMAKE")
    assert extension_build._tool("cmake") != str(fake)


def test_the_gpu_plans_commands_are_accepted_by_the_cli(tmp_path, monkeypatch):
    """The GPU run's own flags (the dry run uses tiny ones) parse and reach the benchmarks as meant: a typo would
    otherwise first show on a lent GPU. The benchmarks themselves are replaced by recorders."""
    import torch
    from typer.testing import CliRunner

    from cmvae_engine.bench import convergence, kernels, train
    from cmvae_engine.engine import profiling
    from cmvae_engine.engine.cli import app

    seen = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the CLI's CUDA check; nothing runs on it
    monkeypatch.setattr(kernels, "device_name", lambda dev: "GPU")
    monkeypatch.setattr(kernels, "run", lambda cases, names, dev, out, progress: seen.setdefault(
        "kernels", (cases, names, dev)) and kernels.BenchResult([], Path(out) / "k.json"))
    row = {"variant": "optimised", "samples_per_s": 1.0, "steps_per_s": 1.0, "tflops": 1.0, "peak_mem_mb": 1.0,
           "projected_paper_run_minutes": 1.0, "options": "", "device": "GPU"}
    monkeypatch.setattr(train, "bench_train", lambda cfg, **kw: seen.setdefault("train", (cfg, kw)) and
                        (Path("t.json"), [row]))
    monkeypatch.setattr(profiling, "profile_training", lambda cfg, **kw: seen.setdefault("profile", (cfg, kw)))
    monkeypatch.setattr(convergence, "run_convergence", lambda s, console: seen.setdefault("convergence", s))
    plan = gs.Plan(dry=False, work=tmp_path, out=tmp_path / "out")
    for cmd in (plan.kernels_command(), plan.train_command(), plan.profile_command(), plan.convergence_command()):
        res = CliRunner().invoke(app, cmd)
        assert res.exit_code == 0, (cmd, res.output)
    cases, names, dev = seen["kernels"]
    assert dev.type == "cuda" and names == list(kernels.BACKENDS) and len(cases) == len(kernels.TRAINING_CASES)
    cfg, kw = seen["train"]
    assert cfg.model.width == 1.0 and not cfg.model.reduced and cfg.data.data_root == str(tmp_path / "data")
    assert kw["steps"] == 30 and kw["warmup"] == 10 and kw["out_dir"] == str(tmp_path / "out")
    cfg, kw = seen["profile"]
    assert cfg.step.compile and cfg.step.cuda_graphs and cfg.model.width == 1.0 and kw["steps"] == 10
    s = seen["convergence"]
    assert (s.recipes, s.seeds, s.width, s.stop_at_k, s.prune_every, s.device) == (["fast"], [0], 1.0, 10, 1, "cuda")
    assert s.budget_minutes == 2 and s.out_dir == str(tmp_path / "out")


def test_a_fused_backend_that_disagrees_is_dropped_and_the_others_timed(tmp_path, monkeypatch):
    ctx = _ctx(tmp_path)
    ctx.plan.out.mkdir()
    calls = []
    shape = {"N": 64, "K": 5, "D": 4}

    def fake_step(ctx_, res, cmd, end, what, check=True):
        calls.append(cmd)
        if len(calls) == 1:
            return gs.Ran(1, 1.0, "RuntimeError: bench kernels: mixture_logpdf [N=64 K=5 D=4] triton grad[0]\n"
                                  "  disagrees with the reference: max error 3 (scale 1)\n")
        rows = [_row("eager", shape, 4.0), _row("compile", shape, 2.0), _row("ext", shape, 1.0, gbps=50.0)]
        (ctx_.plan.out / "kernels-cpu-1.json").write_text(json.dumps(rows))
        return gs.Ran(0, 1.0, "")

    monkeypatch.setattr(gs, "_run_step", fake_step)
    res = gs.run_stage(ctx, next(s for s in gs.STAGES if s.name == "kernels"))
    assert res.status == "warn" and len(calls) == 2
    assert calls[1][calls[1].index("--backends") + 1] == "eager,compile,ext"
    assert "triton" in res.values["disagrees"] and res.values["x_eager"] == pytest.approx(4.0)
    assert res.figure.startswith("bench kernels: mixture_logpdf") and res.files == ["kernels-cpu-1.json"]


def test_the_reason_of_a_failure_is_the_exception_line():
    rich_traceback = ("╭──── Traceback ────╮\n│ raise RuntimeError(msg) │\n╰───────────────────╯\n"
                      "RuntimeError: torch.compile with fullgraph=True found no compiled frames. Skipped frames:\n"
                      "  - forward (model.py:82): Dynamo tracing is disabled\n")
    assert gs.why_it_failed(rich_traceback).startswith("RuntimeError: torch.compile with fullgraph=True")
    assert gs.why_it_failed("loading\nerror: --device cuda: CUDA is not available\n").startswith("error: --device")
    assert gs.why_it_failed("step 1\nstep 2\n╰─────╯\n") == "step 2"


def test_where_the_package_cannot_be_installed_its_sources_go_on_the_path(tmp_path):
    """An interpreter that does not see the installed package (here: this one without site-packages) is given
    the source folders through a linked `cmvae_engine` under --work, as a lent machine whose pip refuses."""
    py = tmp_path / "python"
    py.write_text(f'#!/bin/sh\nexec "{sys.executable}" -S "$@"\n')
    py.chmod(0o755)
    ctx = _ctx(tmp_path)
    ctx.python = str(py)
    ctx.env.pop("PYTHONPATH", None)
    how = gs.ensure_importable(ctx, None, time.monotonic() + 60, install=False)
    assert "PYTHONPATH" in how and (tmp_path / "pythonpath" / "cmvae_engine" / "kernels").resolve() == ROOT / "kernels"
    ran = gs.run_command([str(py), "-c", "import cmvae_engine.bench.gpu_stages as m; print(m.ROOT)"], env=ctx.env,
                         timeout_s=60, log=tmp_path / "import.log")
    assert ran.ok and str(ROOT) in ran.output
