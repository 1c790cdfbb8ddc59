"""The diffusion stage trains through the one training loop: on a (tiny) trained CMVAE run folder, with its
outputs, the CMVAE frozen bit for bit, and a stop-and-resume equal to an uninterrupted run bit for bit."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

from cmvae_engine.cmvae.config import ModelConfig
from cmvae_engine.cmvae.data import synth_polydigits
from cmvae_engine.cmvae.diffusion.model import DCMVAE
from cmvae_engine.cmvae.evaluation.classifier import DigitClassifier
from cmvae_engine.engine import trainer
from cmvae_engine.engine.checkpoint import load_checkpoint
from cmvae_engine.engine.cli import app
from cmvae_engine.engine.config import DataConfig, OptimConfig, TrainConfig
from cmvae_engine.engine.diffusion_run import diffusion_config, resume_config
from cmvae_engine.engine.run import load_run
from cmvae_engine.engine.signals import Stopped
from cmvae_engine.engine.tasks.diffusion_task import DiffusionRecipe

QUIET = Console(quiet=True)


@pytest.fixture(scope="module")
def cmvae_run(tmp_path_factory):
    """A CMVAE trained for 2 steps on 64 tuples of 2 modalities (only its weights and config matter here)."""
    root = tmp_path_factory.mktemp("dcmvae")
    data = synth_polydigits(root / "pd2", n_modalities=2, n_train=64, n_valid=16, n_test=32, seed=0)
    out = root / "cmvae"
    cfg = TrainConfig(model=ModelConfig(n_clusters=3, width=0.0625, z_dim=4, w_dim=4),
                      data=DataConfig(dataset=str(data)), optim=OptimConfig(epochs=1, batch_size=32, max_steps=2),
                      eval_every=0, out=str(out), device="cpu", seed=1)
    trainer.train(cfg, QUIET)
    return out


def _config(run, out, **kw):
    settings = dict(base=8, n_res=1, timesteps=20, warmup_steps=3, epochs=2, batch_size=16, checkpoint_every=1,
                    log_every=1, device="cpu", seed=3, out=out)
    settings.update(kw)
    return diffusion_config(run, **settings)


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_the_diffusion_stage_trains_through_the_loop_on_a_frozen_cmvae(cmvae_run, tmp_path):
    out = tmp_path / "diffusion"
    last = trainer.train(_config(cmvae_run, out), QUIET)
    rows = _rows(out)
    assert [r["epoch"] for r in rows] == [1, 2] and last["step"] == 8
    assert all(r["base"] == 8 and r["reduced"] and r["test_eps_loss_ema"] > 0 for r in rows)
    assert (out / "samples.png").is_file()
    source = load_checkpoint(cmvae_run / "checkpoint.pt")["model"]
    trained = load_checkpoint(out / "checkpoint.pt")["model"]
    cm = {k[len("cmvae."):]: v for k, v in trained.items() if k.startswith("cmvae.")}
    assert cm.keys() == source.keys() and all(torch.equal(v, source[k]) for k, v in cm.items())  # frozen
    assert int(trained["ema_updates"]) == 8
    run = load_run(out)
    assert isinstance(run.model, DCMVAE) and run.config.model.kind == "dcmvae"
    moved = [k for k, v in trained.items() if k.startswith("denoisers.")]
    assert moved  # and the denoisers did train: they differ from a fresh initialisation
    torch.manual_seed(3)
    fresh = DCMVAE(run.config.model).state_dict()
    assert any(not torch.equal(trained[k], fresh[k]) for k in moved)


def test_diffusion_training_resumes_bit_for_bit(cmvae_run, tmp_path, monkeypatch):
    full, cut = tmp_path / "full", tmp_path / "cut"
    trainer.train(_config(cmvae_run, full, eval_every=0, batch_size=32), QUIET)  # 2 steps per epoch
    plain = DiffusionRecipe.after_step

    def stop_at_3(self, ctx):
        plain(self, ctx)
        if ctx.step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(DiffusionRecipe, "after_step", stop_at_3)
    with pytest.raises(Stopped):
        trainer.train(_config(cmvae_run, cut, eval_every=0, batch_size=32), QUIET)  # stops inside epoch 2
    assert load_checkpoint(cut / "checkpoint.pt")["state"]["step"] == 3
    monkeypatch.setattr(DiffusionRecipe, "after_step", plain)
    trainer.train(resume_config(cmvae_run, out=cut), QUIET)
    a, b = load_checkpoint(full / "checkpoint.pt"), load_checkpoint(cut / "checkpoint.pt")
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(v, b["model"][k]) for k, v in a["model"].items())  # weights, EMA and CMVAE
    assert [r["train_loss"] for r in _rows(full)] == pytest.approx([r["train_loss"] for r in _rows(cut)], rel=1e-12)
    assert b["optimizer"]["param_groups"][0]["lr"] == a["optimizer"]["param_groups"][0]["lr"]


def test_the_learning_rate_warms_up_linearly():
    r = DiffusionRecipe(warmup=4, lr=1e-3)
    assert [r.lr_at(s) for s in (1, 2, 4, 10)] == pytest.approx([2.5e-4, 5e-4, 1e-3, 1e-3])


@pytest.fixture(scope="module")
def diffusion_run(cmvae_run):
    """The default diffusion folder RUN_DIR/diffusion, 2 steps, through the command line."""
    result = CliRunner().invoke(app, ["train-diffusion", str(cmvae_run), "--base", "8", "--n-res", "1",
                                      "--timesteps", "20", "--warmup-steps", "2", "--epochs", "1", "--batch-size",
                                      "32", "--eval-every", "0", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    return cmvae_run / "diffusion"


def test_a_diffusion_run_is_not_a_cmvae_source(diffusion_run):
    with pytest.raises(ValueError, match="sits on a trained CMVAE"):
        diffusion_config(diffusion_run)


def test_train_diffusion_resume_refuses_a_changed_denoiser(cmvae_run, diffusion_run):
    result = CliRunner().invoke(app, ["train-diffusion", str(cmvae_run), "--resume", "--base", "16"])
    assert result.exit_code == 2 and "--base cannot change" in result.output
    result = CliRunner().invoke(app, ["train-diffusion", str(cmvae_run), "--resume", "--device", "cpu"])
    assert result.exit_code == 0 and "nothing to do" in result.output


def test_generate_diffusion_writes_both_models_grids(cmvae_run, diffusion_run, tmp_path):
    out = tmp_path / "gen"
    result = CliRunner().invoke(app, ["generate", str(cmvae_run), "--diffusion", "--steps", "3", "--n", "2",
                                      "--device", "cpu", "--out", str(out)])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "diffusion.json").read_text())
    assert set(manifest["files"]) == {"diffusion_unconditional.png", "diffusion_conditional_m0.png",
                                      "diffusion_conditional_m1.png"}
    assert manifest["steps"] == 3 and all((out / f).is_file() for f in manifest["files"])
    assert manifest["strength"] == 1.0


def test_a_strength_outside_zero_to_one_is_refused_by_name(cmvae_run, diffusion_run, tmp_path):
    for command in (["generate", str(cmvae_run), "--diffusion", "--out", str(tmp_path / "g")],
                    ["eval", str(cmvae_run), "--diffusion"]):
        for bad in ("0", "1.5"):
            result = CliRunner().invoke(app, [*command, "--strength", bad, "--device", "cpu"])
            assert result.exit_code == 2 and "--strength" in result.output, result.output
    assert not (tmp_path / "g").exists()


def _classifiers(folder: Path, m: int) -> Path:
    torch.manual_seed(0)
    folder.mkdir()
    for i in range(m):
        torch.save(DigitClassifier(3).state_dict(), folder / f"m{i}.pt")
    (folder / "classifiers.json").write_text(json.dumps({"n_classes": 10, "test_accuracy": [0.95] * m}))
    return folder


def test_eval_diffusion_scores_both_models(cmvae_run, diffusion_run, tmp_path):
    clf = _classifiers(tmp_path / "clf", 2)
    result = CliRunner().invoke(app, ["eval", str(cmvae_run), "--diffusion", "--n-diffusion", "24", "--steps", "2",
                                      "--classifiers", str(clf), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    res = json.loads((cmvae_run / "eval_diffusion.json").read_text())
    for kind in ("unconditional", "conditional"):
        for model in ("cmvae", "dcmvae"):
            row = res[kind][model]
            assert row["classifier_fd"] >= 0 and 0 <= row["coherence"] <= 1
    assert res["n_conditional"] == 24 and res["split"] == "test" and "fid" not in res["unconditional"]["cmvae"]
    # the denoised samples differ from the CMVAE's: so do their scores
    assert res["unconditional"]["cmvae"]["classifier_fd"] != res["unconditional"]["dcmvae"]["classifier_fd"]
    assert res["strength"] == 1.0


def test_bench_diffusion_writes_its_json(tmp_path):
    result = CliRunner().invoke(app, ["bench", "diffusion", "--base", "8", "--n-res", "1", "--modalities", "2",
                                      "--width", "0.0625", "--batch-size", "4", "--train-steps", "1",
                                      "--sample-batch", "2", "--ddim-steps", "2", "--ddpm-probe", "2", "--warmup",
                                      "0", "--device", "cpu", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    (path,) = tmp_path.glob("diffusion-*.json")
    r = json.loads(path.read_text())
    assert r["train_steps_per_s"] > 0 and r["ddim_images_per_s"] > 0 and r["ddpm_images_per_s"] > 0
    assert r["settings"]["reduced"] and r["device"] and "projected" in r["ddpm_note"]


def test_the_report_shows_both_models(cmvae_run, diffusion_run, tmp_path):
    test_eval_diffusion_scores_both_models(cmvae_run, diffusion_run, tmp_path)  # eval_diffusion.json
    from cmvae_engine.engine.report import build_report

    html = build_report(cmvae_run)
    assert "D-CMVAE (diffusion stage)" in html and "classifier-feature distance" in html
    assert html.count("<td>") >= 4 * 3 and "End of diffusion training" in html
