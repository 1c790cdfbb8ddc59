"""`cmvae-engine bench kernels` on its tiny shape set: JSON rows with every documented field, correctness
checks that fail loudly, and clear errors for bad flags."""

import json

import pytest
import torch
from typer.testing import CliRunner

from cmvae_engine.bench import kernels as bench
from cmvae_engine.engine.cli import app

FIELDS = {"op", "backend", "mode", "shape", "median_ms", "p20_ms", "p80_ms", "gbps", "peak_gbps", "peak_mem_mb",
          "device", "torch", "triton", "commit", "time", "skipped"}


@pytest.fixture
def cheap_compile(monkeypatch):
    """torch.compile with the `eager` backend: the benchmark's compile path (dynamo capture of the reference)
    without Inductor's ~30 s C++ build per op on this machine."""
    real = torch.compile
    monkeypatch.setattr(bench.torch, "compile", lambda fn, **kw: real(fn, **{**kw, "backend": "eager"}))


def test_bench_cli_writes_rows(tmp_path, cheap_compile):
    result = CliRunner().invoke(app, ["bench", "kernels", "--tiny", "--device", "cpu", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    files = list(tmp_path.glob("kernels-*.json"))
    assert len(files) == 1 and "cores" in files[0].name
    rows = json.loads(files[0].read_text())
    assert {(r["op"], r["backend"], r["mode"]) for r in rows} == {
        (op, b, m) for op in bench.OPS for b in bench.BACKENDS for m in bench.MODES}
    for r in rows:
        assert set(r) >= FIELDS, FIELDS - set(r)
        assert r["device"].endswith("cores)") and r["time"].endswith("+00:00") and r["peak_gbps"] > 0
        assert r["peak_mem_mb"] is None  # not measured on CPU
        if r["backend"] == "triton":
            assert "CUDA" in r["skipped"] and r["median_ms"] is None
        if r["skipped"] is None:
            assert 0 < r["p20_ms"] <= r["median_ms"] <= r["p80_ms"] and r["gbps"] > 0
            assert r["checked_shape"] == r["shape"]
    measured = {r["backend"] for r in rows if r["skipped"] is None}
    assert {"eager", "compile"} <= measured
    mix = next(r for r in rows if r["op"] == "mixture_logpdf" and r["backend"] == "eager" and r["mode"] == "fwd")
    assert mix["shape"] == {"N": 64, "K": 5, "D": 4} and mix["bytes"] == 4 * (64 * 4 + 2 * 5 * 4 + 5 + 64)
    assert "mixture_logpdf" in result.output and "skipped" in result.output


def test_bench_fails_loudly_on_a_wrong_kernel(tmp_path, monkeypatch):
    case = bench.mixture(16, 3, 2)
    real = bench.Case.fused

    def off_by_one(self, backend, inp):
        fn = real(self, backend, inp)
        return lambda *leaves: fn(*leaves) + 1.0

    monkeypatch.setattr(bench.Case, "fused", off_by_one)
    # the op's own plain-torch backend, shifted by one: any fused backend goes through Case.fused
    with pytest.raises(RuntimeError, match="mixture_logpdf .* torch output disagrees with the reference"):
        bench.bench_case(case, ["torch"], torch.device("cpu"), {})


def test_bench_rejects_unknown_ops_and_backends(tmp_path):
    result = CliRunner().invoke(app, ["bench", "kernels", "--tiny", "--ops", "softmax", "--out", str(tmp_path)])
    assert result.exit_code != 0 and "--ops" in result.output
    result = CliRunner().invoke(app, ["bench", "kernels", "--tiny", "--backends", "cuda", "--out", str(tmp_path)])
    assert result.exit_code != 0 and "--backends" in result.output
    assert not list(tmp_path.glob("*.json"))


def test_training_set_holds_the_step_shapes_and_the_million_point_mixture(tmp_path):
    cases = bench.select_cases("training", list(bench.OPS))
    dims = {(c.op, tuple(c.dims.values())) for c in cases}
    # M=5, B=128, K=40, D=32 at S=1 (N=640) and S=10 (N=6400), the N=65536 comparison and N=1M
    assert {("mixture_logpdf", (n, 40, 32)) for n in (640, 6400, 65536, 1_000_000)} <= dims
    assert {("moe_logq", (5, s, 128, 32)) for s in (1, 10)} <= dims
    assert ("image_loglik", (5, 128, 3 * 28 * 28)) in dims and {c.op for c in cases} == set(bench.OPS)
    result = CliRunner().invoke(app, ["bench", "kernels", "--tiny", "--training", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "--training" in result.output
    assert not list(tmp_path.glob("*.json"))
