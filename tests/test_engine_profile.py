"""`cmvae-engine profile` and `cmvae-engine bench train` on CPU with tiny settings."""

import json

import pytest
import torch
from typer.testing import CliRunner

from cmvae_engine.cmvae.data import synth_polydigits
from cmvae_engine.engine.cli import app

TINY = ["--width", "0.0625", "-k", "4", "--z-dim", "8", "--w-dim", "4", "--batch-size", "32", "--seed", "3"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    # The same data and TINY settings as tests/test_engine_step.py: bench's compiled graph is then the one that
    # test compiles, and whichever runs second finds the inductor cache warm.
    return synth_polydigits(tmp_path_factory.mktemp("data") / "pd2", n_modalities=2, n_train=64, n_valid=16,
                            n_test=32, seed=0)


@pytest.fixture(scope="module")
def inductor_cache(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "inductor"))
    yield
    mp.undo()


def test_profile_writes_trace_and_report(data, tmp_path):
    out = tmp_path / "prof"
    res = CliRunner().invoke(app, ["profile", str(data), "--steps", "2", "--warmup", "1", "--out", str(out), *TINY])
    assert res.exit_code == 0, res.output
    trace = json.loads((out / "trace.json").read_text())
    names = {e.get("name") for e in trace["traceEvents"]}
    assert {"forward", "backward", "optimizer", "data", "decoder[1]"} <= names
    assert {"encoder[0]", "encoders (grouped)"} & names  # per-tower encoder calls, or the grouped one
    report = (out / "report.md").read_text()
    for section in ("## Throughput", "## Time per phase", "## Top", "## Host-device syncs", "## Memory"):
        assert section in report
    assert "| decoder group -> m1 |" in report and "width 0.0625 (REDUCED)" in report
    assert "0 in 2 steps" in report  # no .item() in forward or backward
    assert (out / "phases.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_profile_rejects_unknown_train_flags(data, tmp_path):
    res = CliRunner().invoke(app, ["profile", str(data), "--out", str(tmp_path), "--no-such-flag", "1"])
    assert res.exit_code == 2 and "--no-such-flag" in res.output


def test_bench_train_writes_both_variants(data, tmp_path, inductor_cache):
    # fallback_random: the same random numbers in the compiled variant as in eager (and the graph that
    # tests/test_engine_step.py compiles under the same patch).
    with torch._inductor.config.patch(fallback_random=True):
        res = CliRunner().invoke(app, ["bench", "train", str(data), "--steps", "2", "--warmup", "1", "--out",
                                       str(tmp_path), *TINY])
    assert res.exit_code == 0, res.output
    (path,) = tmp_path.glob("train-*-w0.0625-*.json")
    rows = json.loads(path.read_text())
    assert [r["variant"] for r in rows] == ["baseline", "optimised"]
    for r in rows:
        for key in ("device", "config", "samples_per_s", "steps_per_s", "tflops", "peak_mem_mb",
                    "projected_paper_run_minutes", "commit", "time", "torch"):
            assert key in r, key
        assert r["config"]["width"] == 0.0625 and r["config"]["reduced"]
        assert r["samples_per_s"] > 0 and r["peak_mem_mb"] > 0
        assert r["projected_paper_run_minutes"] == pytest.approx(250 * 60_000 / r["samples_per_s"] / 60)
    base, opt = rows
    assert "per-pair decoders" in base["options"] and base["loader"].startswith("files")
    assert base["kernels"] == "torch" and "compiled" in opt["options"] and opt["loader"] == "resident"
    assert opt["speedup_vs_baseline"] == pytest.approx(opt["samples_per_s"] / base["samples_per_s"])
    # Same data, same random numbers: fp32 rounding apart; the optimised variant takes the default --amp, bf16
    # autocast on AMX CPUs (measured there: 1.8e-5), the bf16 curve tolerance of tests/test_engine_step.py.
    tol = 1e-5 if opt["compute_dtype"] == "float32" else 1e-3
    assert opt["loss_rel_diff_vs_baseline"] < tol
