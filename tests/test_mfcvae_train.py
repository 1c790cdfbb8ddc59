"""MFCVAE trains through the one training loop: from the command line, with its progressive recipe and initial
mixture fit, its per-epoch facet scores and grids; a run stopped mid-fade resumes to the same weights bit for bit;
CMVAE still refuses single-modality data; bad MFCVAE settings are refused by name."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

from cmvae_engine.cmvae.checks import ConfigError
from cmvae_engine.cmvae.data.errors import DataError
from cmvae_engine.cmvae.data.facetdigits import synth_facetdigits
from cmvae_engine.cmvae.mfcvae.config import MFCVAEConfig
from cmvae_engine.engine import trainer
from cmvae_engine.engine.checkpoint import load_checkpoint
from cmvae_engine.engine.cli import app
from cmvae_engine.engine.cli.mfcvae_flags import parse_clusters
from cmvae_engine.engine.config import CheckpointConfig, DataConfig, OptimConfig, TrainConfig
from cmvae_engine.engine.mfcvae_recipe import ProgressiveRecipe
from cmvae_engine.engine.run import load_run
from cmvae_engine.engine.signals import Stopped

QUIET = Console(quiet=True)
SMALL = "hidden=32:16,z_dims=3:3,solo_steps=4,fade_steps=4"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return synth_facetdigits(tmp_path_factory.mktemp("data") / "fd", n_train=96, n_valid=32, n_test=32, seed=0)


def _config(data, out, **kw) -> TrainConfig:
    model = MFCVAEConfig(hidden=[32, 16], z_dims=[3, 3], solo_steps=4, fade_steps=4)
    return TrainConfig(model=model, data=DataConfig(dataset=str(data)),
                       optim=OptimConfig(epochs=3, batch_size=16, lr=1e-3), ckpt=CheckpointConfig(every=1),
                       out=str(out), log_every=1, seed=1, threads=1, **kw)


def _rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_train_command_runs_mfcvae_on_the_loop(data, tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", str(data), "--model", "mfcvae", "--facets", "2", "--clusters", "4,3",
                                      "--mfcvae-set", SMALL, "--epochs", "2", "--batch-size", "32", "--out", str(out),
                                      "--threads", "1"])
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "config.json").read_text())["config"]["model"]
    assert saved["kind"] == "mfcvae" and saved["n_clusters"] == [4, 3] and saved["z_dims"] == [3, 3]
    rows = _rows(out)
    assert len(rows) == 2 and {"valid_bound", "valid_facet0_digit_nmi", "valid_facet1_colour_nmi"} <= set(rows[-1])
    for name in ("recon.png", "facet0_clusters.png", "facet1_clusters.png", "facet_swap.png"):
        assert (out / name).stat().st_size > 0
    events = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
    assert any(e.get("event") == "gmm_init" for e in events)  # the recipe's initial mixture fit happened once
    run = load_run(out)
    assert run.model.config.n_clusters == [4, 3]

    # eval, generate and report on the run
    result = CliRunner().invoke(app, ["eval", str(out), "--split", "valid", "--threads", "1"])
    assert result.exit_code == 0, result.output
    ev = json.loads((out / "eval.json").read_text())
    assert ev["split"] == "valid" and ev["factors"] == ["digit", "colour"]
    assert [f["facet"] for f in ev["facets"]] == [0, 1] and [f["n_clusters"] for f in ev["facets"]] == [4, 3]
    for row in ev["facets"]:
        assert set(row["scores"]) == {"digit", "colour"}
        for s in row["scores"].values():
            assert set(s) == {"nmi", "ari", "acc", "acc_many_to_one"} and 0 <= s["nmi"] <= 1
            assert s["acc_many_to_one"] >= s["acc"] - 1e-12  # many-to-one is never below the one-to-one map
    assert [set(p["accuracy"]) for p in ev["latent_probes"]] == [{"digit", "colour"}] * 2
    result = CliRunner().invoke(app, ["generate", str(out), "--n", "4"])
    assert result.exit_code == 0, result.output
    gen = json.loads((out / "generated" / "generate.json").read_text())
    assert set(gen["files"]) == {"facet0_clusters.png", "facet1_clusters.png", "facet_swap.png"}
    assert all((out / "generated" / name).stat().st_size > 0 for name in gen["files"])
    result = CliRunner().invoke(app, ["report", str(out)])
    assert result.exit_code == 0, result.output
    html = (out / "report.html").read_text()
    assert "Facets x factors (valid split)" in html and "Latent probes" in html and "facet_swap.png" in html


def test_a_stopped_run_resumes_exactly(data, tmp_path, monkeypatch):
    full, cut = tmp_path / "full", tmp_path / "cut"
    trainer.train(_config(data, full), QUIET)

    def stop_at_7(self, ctx):  # mid-fade: facet 0's weights are 0.75 at step 7
        if ctx.step == 7:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(ProgressiveRecipe, "after_step", stop_at_7, raising=False)
    with pytest.raises(Stopped):
        trainer.train(_config(data, cut), QUIET)
    assert load_checkpoint(cut / "checkpoint.pt")["state"]["step"] == 7
    monkeypatch.undo()
    trainer.train(_config(data, cut, resume=True), QUIET)
    a, b = load_checkpoint(full / "checkpoint.pt"), load_checkpoint(cut / "checkpoint.pt")
    assert a["state"]["step"] == b["state"]["step"] == 18
    assert all(torch.equal(v, b["model"][k]) for k, v in a["model"].items())  # bit for bit
    assert [r["train_loss"] for r in _rows(full)] == pytest.approx([r["train_loss"] for r in _rows(cut)], rel=1e-12)


def test_cmvae_still_refuses_a_single_modality_folder(data, tmp_path):
    cfg = TrainConfig(data=DataConfig(dataset=str(data)), out=str(tmp_path / "c"), optim=OptimConfig(epochs=1))
    with pytest.raises(DataError, match="needs at least 2"):
        trainer.build_engine(cfg)


def test_bad_mfcvae_settings_are_refused_by_name():
    with pytest.raises(ConfigError, match=r"--clusters K1,K2 \(model.n_clusters\) must list 2 integers"):
        MFCVAEConfig(n_clusters=[4, 4, 4])
    with pytest.raises(ConfigError, match="--facets"):
        MFCVAEConfig(n_facets=0)
    with pytest.raises(ConfigError, match="refit_every"):
        MFCVAEConfig(refit_every=-1)
    with pytest.raises(ConfigError, match="--clusters must be an integer"):
        parse_clusters("4,x")
    assert parse_clusters("40") == 40 and parse_clusters("25,25") == [25, 25]
    result = CliRunner().invoke(app, ["train", "facetdigits", "--model", "mfcvae", "--mfcvae-set", "z_dims=5"])
    assert result.exit_code != 0 and "must list 2 integers" in result.output.replace("\n", "")


def test_amp_and_a_streaming_loader_train_mfcvae(data, tmp_path):
    from cmvae_engine.engine.config import StepConfig

    cfg = _config(data, tmp_path / "amp", step=StepConfig(amp=True))
    cfg.data.loader, cfg.data.workers, cfg.optim.epochs = "files", 0, 1
    last = trainer.train(cfg, QUIET)
    assert last["step"] == 6 and abs(last["train_loss"]) < 1e6 and last["valid_bound"] == last["valid_bound"]
