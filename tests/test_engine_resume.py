"""Checkpoints and exact resume: an interrupted-and-resumed run equals an uninterrupted one; signals stop
cleanly; a non-finite loss stops with the step named and the last good checkpoint kept."""

import json
import os
import signal

import pytest
import torch
from rich.console import Console

from cmvae_engine.cmvae.config import ModelConfig
from cmvae_engine.cmvae.data import synth_polydigits
from cmvae_engine.engine import trainer
from cmvae_engine.engine.checkpoint import load_checkpoint
from cmvae_engine.engine.config import CheckpointConfig, DataConfig, OptimConfig, TrainConfig
from cmvae_engine.engine.recipes import PaperRecipe
from cmvae_engine.engine.run import load_run
from cmvae_engine.engine.signals import Stopped
from cmvae_engine.engine.tasks import cmvae_task

QUIET = Console(quiet=True)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    # 80 tuples at batch 32: 3 batches per epoch, the last one partial (16), as the reference keeps it.
    return synth_polydigits(tmp_path_factory.mktemp("data") / "pd3", n_modalities=3, n_train=80, n_valid=16,
                            n_test=32, seed=0)


def config(data, out, *, max_steps=None, resume=False, every=0, keep=3, epochs=3, loader="resident") -> TrainConfig:
    return TrainConfig(model=ModelConfig(n_clusters=4, z_dim=8, w_dim=4, width=0.0625),
                       data=DataConfig(dataset=str(data), loader=loader, workers=0),
                       optim=OptimConfig(epochs=epochs, batch_size=32, max_steps=max_steps),
                       ckpt=CheckpointConfig(every=every, keep=keep), out=str(out), log_every=2, eval_every=0,
                       seed=5, resume=resume)


def rows(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(a, b) -> None:
    ca, cb = load_checkpoint(a / "checkpoint.pt"), load_checkpoint(b / "checkpoint.pt")
    assert ca["state"]["step"] == cb["state"]["step"]
    for k, v in ca["model"].items():
        assert torch.equal(v, cb["model"][k]), k  # bit for bit
    for (ka, va), (kb, vb) in zip(ca["optimizer"]["state"].items(), cb["optimizer"]["state"].items(), strict=True):
        assert ka == kb and all(torch.equal(va[s], vb[s]) for s in va)
    ra, rb = rows(a), rows(b)
    assert [r["epoch"] for r in ra] == [r["epoch"] for r in rb]
    # The epoch loss is a float64 sum; a resumed run folds it at the interruption: equal to 1e-12.
    assert [r["train_loss"] for r in ra] == pytest.approx([r["train_loss"] for r in rb], rel=1e-12)


@pytest.fixture(scope="module")
def full_runs(data, tmp_path_factory):
    """Uninterrupted runs, one per loader, made on first use."""
    runs = {}

    def get(loader: str = "resident"):
        if loader not in runs:
            runs[loader] = tmp_path_factory.mktemp(f"full-{loader}")
            trainer.train(config(data, runs[loader], loader=loader), QUIET)
        return runs[loader]

    return get


@pytest.fixture
def uninterrupted(full_runs):
    return full_runs("resident")


# `files` reads tuples through a DataLoader, whose epoch start draws from torch's global generator: the
# trainer keeps that draw away from the sampling noise, or this resume would not be exact.
@pytest.mark.parametrize("loader", ["resident", "files"])
def test_resume_after_max_steps_equals_uninterrupted_run(data, tmp_path, full_runs, loader):
    uninterrupted = full_runs(loader)
    out = tmp_path / "run"
    first = trainer.train(config(data, out, max_steps=4, every=1, keep=2, loader=loader), QUIET)
    assert first["step"] == 4 and first["epoch"] == 2  # stopped one batch into epoch 2
    assert sorted(p.name for p in out.glob("ckpt-*.pt")) == ["ckpt-00000003.pt", "ckpt-00000004.pt"]
    assert load_checkpoint(out / "checkpoint.pt")["state"]["batch_in_epoch"] == 1
    assert len(rows(out)) == 2  # epoch 1 and the partial epoch 2
    last = trainer.train(config(data, out, resume=True, every=1, keep=2, loader=loader), QUIET)
    assert last["step"] == 9 and last["epoch"] == 3
    assert_same_run(out, uninterrupted)
    assert load_run(out).model.config.width == 0.0625  # prune/eval still read the latest checkpoint


class _SignalAt(PaperRecipe):
    def __init__(self, step: int, signum: int):
        super().__init__()
        self.at, self.signum = step, signum

    def after_step(self, ctx) -> None:
        if ctx.step == self.at:
            os.kill(os.getpid(), self.signum)


def test_sigterm_checkpoints_and_resume_is_exact(data, tmp_path, uninterrupted, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setattr(cmvae_task, "build_recipe", lambda name, fast=None, beta=2.5: _SignalAt(5, signal.SIGTERM))
    with pytest.raises(Stopped) as stopped:
        trainer.train(config(data, out), QUIET)
    assert stopped.value.exit_code == 143 and stopped.value.step == 5  # 128 + SIGTERM: schedulers see "killed"
    assert stopped.value.checkpoint == out / "ckpt-00000005.pt"
    state = load_checkpoint(out / "checkpoint.pt")["state"]
    assert (state["step"], state["epoch"], state["batch_in_epoch"]) == (5, 1, 2)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored
    monkeypatch.undo()
    trainer.train(config(data, out, resume=True), QUIET)
    assert_same_run(out, uninterrupted)


class _NanBeta(PaperRecipe):
    def beta(self, step: int, base: float) -> float:
        return float("nan") if step == 6 else base  # poisons the loss of step 7 (steps count from 1)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(data, tmp_path, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setattr(cmvae_task, "build_recipe", lambda name, fast=None, beta=2.5: _NanBeta())
    with pytest.raises(FloatingPointError, match=r"non-finite loss at step 7.*ckpt-00000006\.pt"):
        trainer.train(config(data, out, every=2), QUIET)
    ckpt = load_checkpoint(out / "checkpoint.pt")
    assert ckpt["state"]["step"] == 6
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
    assert not (out / "ckpt-00000008.pt").exists()


def test_resume_refuses_a_different_model_and_a_missing_run(data, tmp_path, uninterrupted):
    cfg = config(data, uninterrupted, resume=True)
    cfg.model.width = 0.125
    with pytest.raises(ValueError, match=r"--width \(model\.width\) = 0\.0625"):
        trainer.train(cfg, QUIET)
    with pytest.raises(ValueError, match="--resume: no checkpoint in"):
        trainer.train(config(data, tmp_path / "nothing", resume=True), QUIET)


def test_cli_resume_takes_the_saved_settings(data, tmp_path):
    from typer.testing import CliRunner

    from cmvae_engine.engine.cli import app

    out = str(tmp_path / "run")
    tiny = ["--width", "0.0625", "-k", "4", "--z-dim", "8", "--w-dim", "4", "--batch-size", "32", "--eval-every", "0"]
    first = CliRunner().invoke(app, ["train", str(data), *tiny, "--max-steps", "2", "--out", out])
    assert first.exit_code == 0, first.output
    # No model flags: they come from the run; --max-steps overrides the saved value.
    res = CliRunner().invoke(app, ["train", str(data), "--resume", "--max-steps", "4", "--out", out])
    assert res.exit_code == 0, res.output
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert ckpt["state"]["step"] == 4 and ckpt["config"]["model"]["width"] == 0.0625
    assert ckpt["config"]["optim"]["max_steps"] == 4
