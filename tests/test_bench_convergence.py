"""The convergence benchmark end to end with tiny settings: the JSON it writes, the plot, the CLI's errors."""

import json

import pytest
from PIL import Image
from typer.testing import CliRunner

from cmvae_engine.bench.convergence import THRESHOLDS, ConvergenceSettings, first_crossings, run_convergence
from cmvae_engine.cmvae.data import synth_polydigits
from cmvae_engine.engine.cli import app
from cmvae_engine.engine.config import FastRecipeConfig


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data") / "pd3"
    return synth_polydigits(root, n_modalities=3, n_train=96, n_valid=32, n_test=48, seed=0)


def test_benchmark_writes_json_and_plot(tiny_data, tmp_path):
    # without the warm start, so that `fast` trains exactly as `paper` until its prior fit
    fast = FastRecipeConfig(contrast=False, min_steps=0, check_every=2, probe_size=32, agree_min=0.0,
                            agree_plateau=1.0)
    s = ConvergenceSettings(dataset=str(tiny_data), recipes=["paper", "fast"], seeds=[0], budget_minutes=5,
                            max_steps=6, eval_every_steps=3, prune_every=2, width=0.0625, clusters=5,
                            batch_size=32, fast=fast, diagnostics=True, threads=1, out_dir=str(tmp_path))
    path = run_convergence(s)
    assert path.parent == tmp_path and path.name.startswith("convergence-polydigits-cpu-w0.0625-")
    d = json.loads(path.read_text())
    assert d["device_type"] == "cpu" and "cores" in d["device"] and d["torch"] and d["commit"]
    assert d["width"] == 0.0625 and d["reduced"] is True and d["clusters"] == 5 and d["n_modalities"] == 3
    assert [(r["recipe"], r["seed"]) for r in d["runs"]] == [("paper", 0), ("fast", 0)]
    for r in d["runs"]:
        assert r["steps"] == 6 and r["train_s"] > 0 and r["eval_s"] > 0
        assert [row["step"] for row in r["curve"]] == [0, 3, 6]
        assert [row["train_s"] for row in r["curve"]] == sorted(row["train_s"] for row in r["curve"])
        # pruned at evaluations 0 and 2 (prune_every=2) and always at the end
        assert ["pruned_k" in row for row in r["curve"]] == [True, False, True]
        for row in r["curve"]:
            for split in ("valid", "test"):  # each split in its own columns, named by it
                assert 0 <= row[f"{split}_nmi"] <= 1 and -1 <= row[f"{split}_ari"] <= 1
                assert 0 <= row[f"{split}_acc"] <= 1 and 1 <= row[f"{split}_in_use"] <= 5
                assert f"{split}_kmeans_nmi" in row
                assert (f"{split}_pruned_nmi" in row) == ("pruned_k" in row)
            assert "nmi" not in row and "pruned_nmi" not in row  # no column without its split
            if "pruned_k" in row:
                assert row["prune_split"] == "valid"
        assert 2 <= r["final_prune"]["chosen_k"] <= 5 and r["final_prune"]["split"] == "valid"
        assert set(r["final_prune"]) >= {"valid", "test"}
        assert set(r["first_reached"]) == {f"{split}_{k}>={t}" for split in ("valid", "test")
                                           for k in ("nmi", "pruned_nmi") for t in THRESHOLDS}
        assert len(r["loadavg_start"]) == 3 and len(r["loadavg_end"]) == 3
        assert r["config"]["recipe"] == r["recipe"] and r["config"]["model"]["width"] == 0.0625
    paper, fast_run = d["runs"]
    assert paper["active_elements"] == [] and paper["recipe_log"] == {}
    assert fast_run["active_elements"] == ["init", "refit", "prior-lr"]
    assert fast_run["recipe_log"]["fitted_at"] == 4  # checks at 2 (first) and 4 (levelled: plateau 1.0)
    # Until the fit the two recipes train identically: same curve at step 3.
    assert paper["curve"][1]["test_nmi"] == fast_run["curve"][1]["test_nmi"]
    assert paper["curve"][1]["valid_nmi"] == fast_run["curve"][1]["valid_nmi"]
    assert [s["recipe"] for s in d["summary"]] == ["paper", "fast"]
    assert d["score_splits"] == ["valid", "test"] and d["n_valid"] == 32 and d["n_test"] == 48
    with Image.open(path.with_suffix(".png")) as im:
        assert im.size[0] > 600 and im.size[1] > 300


def test_first_crossings_reports_the_first_evaluation_at_or_above_each_threshold():
    curve = [{"step": 0, "train_s": 0.0, "test_nmi": 0.1, "valid_nmi": 0.6},
             {"step": 10, "train_s": 5.0, "test_nmi": 0.85, "test_pruned_nmi": 0.5, "valid_nmi": 0.2},
             {"step": 20, "train_s": 9.0, "test_nmi": 0.7, "test_pruned_nmi": 0.95, "valid_nmi": 0.95}]
    got = first_crossings(curve, ["valid", "test"])
    assert got["test_nmi>=0.5"] == {"train_s": 5.0, "step": 10}
    assert got["test_nmi>=0.8"] == {"train_s": 5.0, "step": 10}
    assert got["test_nmi>=0.9"] is None
    assert got["test_pruned_nmi>=0.5"] == {"train_s": 5.0, "step": 10}
    assert got["test_pruned_nmi>=0.9"] == {"train_s": 9.0, "step": 20}
    # the valid columns are tracked on their own
    assert got["valid_nmi>=0.5"] == {"train_s": 0.0, "step": 0}
    assert got["valid_nmi>=0.9"] == {"train_s": 9.0, "step": 20}
    assert got["valid_pruned_nmi>=0.5"] is None


def test_score_splits_chooses_the_columns(tiny_data, tmp_path):
    s = ConvergenceSettings(dataset=str(tiny_data), recipes=["paper"], seeds=[0], budget_minutes=5, max_steps=2,
                            eval_every_steps=2, width=0.0625, clusters=4, batch_size=32, threads=1,
                            score_splits=["test"], out_dir=str(tmp_path))
    d = json.loads(run_convergence(s).read_text())
    final = d["runs"][0]["final"]
    assert "test_pruned_nmi" in final and not any(k.startswith("valid_") for k in final)
    assert final["prune_split"] == "valid"  # pruning still selects on valid
    with pytest.raises(ValueError, match="--score-splits"):
        ConvergenceSettings(score_splits=["train"])


def test_cli_refuses_bad_flags_with_a_clear_message(tiny_data, tmp_path):
    runner = CliRunner()
    cases = [(["--seeds", "0,x"], "--seeds takes comma-separated integers"),
             (["--recipes", "paper,quick"], "--recipe"),
             (["--fast-disable", "warmup"], "--fast-disable"),
             (["--budget-minutes", "0"], "--budget-minutes"),
             (["--score-splits", "valid,valid"], "--score-splits")]
    for extra, message in cases:
        res = runner.invoke(app, ["bench", "convergence", str(tiny_data), "--out-dir", str(tmp_path), *extra])
        assert res.exit_code == 2, (extra, res.output)
        assert message in " ".join(res.output.split()), (extra, res.output)
    res = runner.invoke(app, ["bench", "convergence", str(tmp_path / "missing"), "--out-dir", str(tmp_path)])
    assert res.exit_code == 2 and "no such folder" in res.output
    assert not list(tmp_path.glob("*.json"))


def test_every_evaluation_rewrites_the_json_with_the_run_under_way(tiny_data, tmp_path, monkeypatch):
    from cmvae_engine.bench import convergence

    seen = []
    real_write = convergence.atomic_write_json

    def spy(path, obj):
        seen.append(json.loads(json.dumps(obj)))
        real_write(path, obj)

    monkeypatch.setattr(convergence, "atomic_write_json", spy)
    s = ConvergenceSettings(dataset=str(tiny_data), recipes=["paper"], seeds=[0], budget_minutes=5, max_steps=4,
                            eval_every_steps=2, width=0.0625, clusters=4, batch_size=32, threads=1,
                            out_dir=str(tmp_path))
    run_convergence(s)
    # evaluations at steps 0 and 2 write the run so far; the end writes the complete run
    partial = [d["runs"][-1] for d in seen if d["finished"] is None]
    assert [[row["step"] for row in r["curve"]] for r in partial] == [[0], [0, 2]]
    assert all(r["complete"] is False for r in partial)
    assert seen[-1]["finished"] and seen[-1]["runs"][0]["complete"] is True
    assert [row["step"] for row in seen[-1]["runs"][0]["curve"]] == [0, 2, 4]


def test_stop_at_k_ends_the_run_at_the_first_evaluation_that_prunes_to_k(tiny_data, tmp_path, monkeypatch):
    """The pruning is made to choose 3 clusters from its third call on (step 4): the run stops there, and that
    evaluation is the last point of its curve."""
    import dataclasses

    from cmvae_engine.bench import convergence

    real, calls = convergence.prune_latents, []

    def prune_to_three_from_the_third_call(*args, **kwargs):
        calls.append(1)
        res = real(*args, **kwargs)
        return dataclasses.replace(res, chosen_k=3) if len(calls) >= 3 else dataclasses.replace(res, chosen_k=5)

    monkeypatch.setattr(convergence, "prune_latents", prune_to_three_from_the_third_call)
    s = ConvergenceSettings(dataset=str(tiny_data), recipes=["paper"], seeds=[0], budget_minutes=5, max_steps=12,
                            eval_every_steps=2, width=0.0625, clusters=5, batch_size=32, stop_at_k=3, threads=1,
                            out_dir=str(tmp_path))
    d = json.loads(run_convergence(s).read_text())
    (run,) = d["runs"]
    assert d["stop_at_k"] == 3 and run["stop_at_k"] == 3 and len(calls) == 3
    assert [row["step"] for row in run["curve"]] == [0, 2, 4] and run["steps"] == 4
    assert run["reached_k"]["step"] == 4 and run["reached_k"]["train_s"] == run["curve"][-1]["train_s"] > 0
    assert run["final_prune"]["chosen_k"] == 3 and d["summary"][0]["reached_k"] == run["reached_k"]
    with pytest.raises(ValueError, match="--stop-at-k must be between 1 and --clusters"):
        ConvergenceSettings(dataset=str(tiny_data), clusters=5, stop_at_k=6)
    with pytest.raises(ValueError, match="--prune-every 1"):
        ConvergenceSettings(dataset=str(tiny_data), clusters=5, stop_at_k=3, prune_every=2)
