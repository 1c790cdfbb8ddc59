"""What a user sees and what a run records: progress bars, the epoch line, the cost projection, steps.jsonl and the
optional TensorBoard / W&B sinks, run_info.json."""

import json
import os
import subprocess
import sys

import pytest
from rich.console import Console

from cmvae_engine.cmvae.config import ModelConfig
from cmvae_engine.cmvae.data import synth_polydigits
from cmvae_engine.cmvae.data.polydigits import make_polydigits_splits
from cmvae_engine.cmvae.progress import shifted
from cmvae_engine.engine import cost
from cmvae_engine.engine.config import DataConfig, FastRecipeConfig, OptimConfig, TrainConfig
from cmvae_engine.engine.logsinks import JsonlSink, parse_sinks
from cmvae_engine.engine.progress import Board, epoch_line, format_duration, format_number
from cmvae_engine.engine.trainer import train


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return synth_polydigits(tmp_path_factory.mktemp("data") / "pd2", n_modalities=2, n_train=64, n_valid=16,
                            n_test=32, seed=0)


def config(data, out, **kw):
    return TrainConfig(model=ModelConfig(n_clusters=3, z_dim=4, w_dim=4, width=0.0625),
                       data=DataConfig(dataset=str(data)), optim=OptimConfig(epochs=2, batch_size=16),
                       out=str(out), log_every=2, device="cpu", **kw)


def records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


# ----- pure pieces ----------------------------------------------------------------------------------------------
def test_durations_numbers_and_the_epoch_line():
    assert [format_duration(s) for s in (1.25, 45, 372, 3 * 3600 + 300, 2 * 86400 + 4 * 3600 + 5)] == \
        ["1.2s", "45s", "6m12s", "3h05m", "2d04h"]
    assert [format_number(v) for v in (9512.34, -9480.06, 12.345, 0.95312, 7)] == \
        ["9,512.3", "-9,480.1", "12.35", "0.953", "7"]
    row = {"epoch": 3, "step": 711, "train_loss": 9512.34, "elapsed_s": 372.0, "samples_per_s": 212.4,
           "width": 0.125, "reduced": True, "test_bound": -9480.06, "test_nmi": 0.9531, "test_ari": 0.94,
           "test_acc": 0.97, "test_n_clusters": 10}
    assert epoch_line(row, 250, skip=("width", "reduced")) == (
        "epoch 3/250  step 711  loss 9,512.3  test bound -9,480.1  NMI 0.953  ARI 0.940  ACC 0.970  clusters 10  "
        "212 samples/s  6m12s")


def test_cost_projection_and_warning():
    p = cost.project(total_steps=19_750, done_steps=4, seconds=4.5, measured_steps=3)
    assert p.seconds_per_step == 1.5 and p.remaining_steps == 19_746 and p.remaining_s == 19_746 * 1.5
    text = cost.cost_warning(p, "paper recipe, full width, 250 epochs", "cpu")
    assert "19,750 steps" in text and "8h13m" in text and "1.5 s/step over 3 steps" in text and "--width 0.125" in text
    assert cost.cost_warning(p, "x", "cuda") is not None and "quick start" not in cost.cost_warning(p, "x", "cuda")
    short = cost.project(total_steps=100, done_steps=4, seconds=3.0, measured_steps=3)
    assert cost.cost_warning(short, "x", "cpu") is None  # 96 s: nothing to say
    # a model the quick start does not train (e.g. the diffusion stage) gets the cost without the hint
    other = cost.cost_warning(p, "dcmvae, 50 epochs", "cpu", quick_start_hint=False)
    assert other is not None and other.startswith("dcmvae, 50 epochs") and "quick start" not in other
    assert "first step took" in cost.cost_warning(short, "x", "cpu", threshold_s=10, first_step=True)
    with pytest.raises(ValueError):
        cost.project(10, 0, 1.0, 0)


def test_progress_callbacks_reach_the_end():
    seen = []
    make_polydigits_splits(n_modalities=2, n_train=8, n_valid=4, n_test=4, progress=lambda d, t: seen.append((d, t)))
    assert seen[0] == (0, 8) and seen[-1] == (7, 8) and [d for d, _ in seen] == sorted(d for d, _ in seen)
    stage = []
    shifted(lambda d, t: stage.append((d, t)), 10, 30)(4, 20)
    assert stage == [(14, 30)] and shifted(None, 1, 2) is None
    console = Console(record=True, width=100, force_terminal=False)
    with Board(console) as board:
        with board.phase("quiet", lazy=True):
            pass  # a lazy phase never called leaves no line
        with board.phase("work", total=3) as bar:
            bar(3, 3)
    text = console.export_text()
    assert "quiet" not in text and "work: done in" in text


def test_sink_names_are_checked():
    assert parse_sinks("tensorboard, wandb,tensorboard") == ["tensorboard", "wandb"] and parse_sinks("") == []
    with pytest.raises(ValueError, match="unknown sink 'mlflow'"):
        TrainConfig(log=["mlflow"])


def test_jsonl_sink_keeps_lines_up_to_the_resumed_step(tmp_path):
    sink = JsonlSink(tmp_path, resume_step=None)
    for step in (2, 4, 6):
        sink.step(step, {"loss": float(step)})
    sink.event(4, {"event": "prior_fit", "in_use": 3})
    sink.close()
    cut = tmp_path / "steps.jsonl"
    cut.write_text(cut.read_text() + '{"kind": "step", "st')  # a line cut by a kill
    sink = JsonlSink(tmp_path, resume_step=4)
    sink.step(6, {"loss": 60.0})
    sink.close()
    assert [(r["kind"], r["step"]) for r in records(cut)] == [("step", 2), ("step", 4), ("event", 4), ("step", 6)]
    assert records(cut)[-1]["loss"] == 60.0
    JsonlSink(tmp_path, resume_step=None).close()  # a fresh run starts it empty
    assert cut.read_text() == ""


# ----- the loop -------------------------------------------------------------------------------------------------
def test_training_logs_steps_events_run_info_and_a_readable_epoch_line(data, tmp_path, monkeypatch):
    monkeypatch.setattr(cost, "LONG_RUN_S", 0.0)  # every run is "long": the projection must be printed
    console = Console(record=True, width=200, force_terminal=False)
    # A fixed InfoNCE weight, not the default: the step of the fit below depends on it in this tiny run.
    fast = FastRecipeConfig(contrast_steps=4, contrast_anneal_steps=3, min_steps=2, check_every=2, agree_min=0.0,
                            agree_plateau=1.0, probe_size=16, contrast_weight=500.0)
    train(config(data, tmp_path / "run", recipe="fast", fast=fast), console)
    text = console.export_text()
    assert "this run is long: fast recipe, width 0.0625, 2 epochs = 8 steps" in text
    assert "the first step took" in text and "s/step over 3 steps" in text
    lines = [line for line in text.splitlines() if line.startswith("epoch ")]
    assert len(lines) == 2 and lines[0].startswith("epoch 1/2  step 4  loss ") and "NMI " in lines[0]
    assert "=" not in lines[0] and "width" not in lines[0]
    log = records(tmp_path / "run" / "steps.jsonl")
    steps = [r for r in log if r["kind"] == "step"]
    assert [r["step"] for r in steps] == [2, 4, 6, 8]
    assert {"loss", "samples_per_s", "lr", "beta", "aux_weight", "epoch"} <= set(steps[0])
    assert steps[0]["aux_weight"] > 0 and steps[-1]["aux_weight"] == 0.0  # the recipe's faded term
    events = [r for r in log if r["kind"] == "event"]
    names = [e["event"] for e in events]
    assert names[:2] == ["warm_start_loss", "warm_start_done"] and "prior_fit" in names
    fit = names.index("prior_fit")  # the fit follows the check that triggered it, at the same step
    assert events[fit - 1]["event"] == "check" and events[fit - 1]["step"] == events[fit]["step"] == 4
    assert [r["epoch"] for r in log if r["kind"] == "epoch"] == [1, 2]
    info = json.loads((tmp_path / "run" / "run_info.json").read_text())["sessions"]
    assert len(info) == 1 and info[0]["torch"] and info[0]["resumed"] is False and "command" in info[0]


def test_tensorboard_sink(data, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(config(data, tmp_path / "tb", log=["tensorboard"]))
    acc = EventAccumulator(str(tmp_path / "tb" / "tensorboard"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {"train/loss", "train/samples_per_s", "train/lr/0", "train/beta", "eval/test_bound"} <= set(tags)
    assert [e.step for e in acc.Scalars("train/loss")] == [2, 4, 6, 8]
    jsonl = [r["loss"] for r in records(tmp_path / "tb" / "steps.jsonl") if r["kind"] == "step"]
    assert [e.value for e in acc.Scalars("train/loss")] == pytest.approx(jsonl, rel=1e-6)


def test_wandb_sink_offline(data, tmp_path):
    """In a child process with WANDB_MODE=offline and no network settings: the run is written to RUN/wandb/."""
    pytest.importorskip("wandb")
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DISABLE_GIT": "true",
           "WANDB_DIR": str(tmp_path), "WANDB_CONFIG_DIR": str(tmp_path / "cfg"), "WANDB_CACHE_DIR": str(tmp_path)}
    code = ("import json, sys; from cmvae_engine.engine.config import TrainConfig; "
            "from cmvae_engine.engine.trainer import train; train(TrainConfig.from_dict(json.loads(sys.argv[1])))")
    cfg = config(data, tmp_path / "wb", log=["wandb"]).to_dict()
    res = subprocess.run([sys.executable, "-c", code, json.dumps(cfg)], env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    runs = list((tmp_path / "wb" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    assert (tmp_path / "wb" / "wandb" / "id").read_text().strip() in runs[0].name


def test_weak_classifiers_are_flagged_at_training_and_at_eval(data, tmp_path):
    from typer.testing import CliRunner

    from cmvae_engine.engine.cli import app

    runner = CliRunner()
    clf = tmp_path / "clf"
    res = runner.invoke(app, ["classifiers", "train", str(data), "--max-steps", "1", "--out", str(clf),
                              "--device", "cpu"])
    assert res.exit_code == 0, res.output
    acc = json.loads((clf / "classifiers.json").read_text())["test_accuracy"]
    assert max(acc) < 0.9  # one step: near chance
    assert "warning: weak digit classifiers" in " ".join(res.output.split())
    train(config(data, tmp_path / "run", eval_every=0))
    res = runner.invoke(app, ["eval", str(tmp_path / "run"), "--classifiers", str(clf), "--no-latent",
                              "--n-unconditional", "32", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    out = " ".join(res.output.split())
    assert "warning: weak digit classifiers" in out
    assert out.index("Clustering") < out.index("clustering: ")  # each table is printed when its section ends
    ev = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert "below 90% test accuracy" in ev["coherence"]["weak_classifiers"]
    assert sum(map(sum, ev["clustering"]["confusion"]["counts"])) == 32 and ev["run_info"]["torch"]
