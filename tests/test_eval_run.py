"""Evaluation of a tiny trained run: clustering, coherence, latent probes, FID and the `eval` command."""

import json
import shutil
import socket

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from cmvae_engine.cmvae.config import ModelConfig
from cmvae_engine.cmvae.data import read_dataset, synth_polydigits
from cmvae_engine.cmvae.evaluation.classifier import ClassifierSet, DigitClassifier, train_classifier_set
from cmvae_engine.cmvae.evaluation.coherence import conditional_coherence, unconditional_coherence
from cmvae_engine.engine.cli import app
from cmvae_engine.engine.cli.classifiers_cmd import write_classifier_folder
from cmvae_engine.engine.config import DataConfig, OptimConfig, TrainConfig
from cmvae_engine.engine.eval_run import EvalConfig, run_eval
from cmvae_engine.engine.loaders import stack_modalities
from cmvae_engine.engine.run import load_run
from cmvae_engine.engine.trainer import train


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("evalrun")
    data = synth_polydigits(base / "pd3", n_modalities=3, n_train=200, n_valid=0, n_test=100, seed=0)
    cfg = TrainConfig(model=ModelConfig(n_clusters=6, z_dim=8, w_dim=4, width=0.0625),
                      data=DataConfig(dataset=str(data)),
                      optim=OptimConfig(epochs=1, batch_size=32, lr=3e-3, max_steps=6), out=str(base / "run"),
                      log_every=3, eval_every=0)
    train(cfg)
    return base / "run", data


@pytest.fixture(scope="module")
def loaded(tiny_run):
    run_dir, data = tiny_run
    run = load_run(run_dir)
    test = read_dataset(data).split("test")
    return run.model, stack_modalities(test.modalities), test.labels


def constant_classifier(label: int, n_classes: int = 10) -> DigitClassifier:
    """Predicts `label` for every input: zero last layer with a one-hot bias."""
    clf = DigitClassifier(n_classes=n_classes)
    with torch.no_grad():
        last = clf.encoder[-1]
        last.weight.zero_()
        last.bias.copy_(nn.functional.one_hot(torch.tensor(label), n_classes).float())
    return clf.eval()


def test_coherence_counts_each_target_with_its_own_classifier(loaded):
    model, images, labels = loaded
    per_target = ClassifierSet([constant_classifier(t) for t in range(3)], "trained", None)
    cond = conditional_coherence(model, per_target, images, labels, batch_size=30,
                                 generator=torch.Generator().manual_seed(0))
    expected = [float(np.mean(labels == t)) for t in range(3)]
    assert np.allclose(cond["matrix"], [expected] * 3)
    assert cond["average"] == pytest.approx(np.mean(expected)) and cond["n"] == 100
    # Disagreeing classifiers are never coherent; agreeing ones always are, on the label they agree on.
    assert unconditional_coherence(model, per_target, 50, batch_size=16)["coherence"] == 0.0
    same = ClassifierSet([constant_classifier(4) for _ in range(3)], "trained", None)
    unc = unconditional_coherence(model, same, 50, batch_size=16)
    assert unc["coherence"] == 1.0 and unc["agreed_label_counts"][4] == 50 and sum(unc["agreed_label_counts"]) == 50


def test_eval_refuses_without_classifiers(tiny_run):
    run_dir, data = tiny_run
    result = CliRunner().invoke(app, ["eval", str(run_dir), "--device", "cpu"])
    assert result.exit_code == 2
    text = " ".join(result.output.split())
    assert f"cmvae-engine classifiers train {data.absolute()}" in text and "--no-coherence" in text
    assert not (run_dir / "eval.json").exists()


def test_eval_command_end_to_end(tiny_run, tmp_path):
    run_dir, data = tiny_run
    models, record = train_classifier_set(read_dataset(data).splits, dataset=str(data), epochs=1, max_steps=2,
                                          log=lambda s: None)
    clf_dir = write_classifier_folder(tmp_path / "clf", models, record)
    args = ["eval", str(run_dir), "--device", "cpu", "--classifiers", str(clf_dir), "--n-unconditional", "40",
            "--n-latent-train", "50"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "Conditional coherence" in result.output and "Clustering" in result.output
    ev = json.loads((run_dir / "eval.json").read_text())
    assert ev["checkpoint"] == "checkpoint.pt" and ev["split"] == "test" and ev["n"] == 100
    assert set(ev["clustering"]["per_modality"]) == {"m0", "m1", "m2"}
    mat = np.array(ev["coherence"]["conditional"]["matrix"])
    assert mat.shape == (3, 3) and ((mat >= 0) & (mat <= 1)).all()
    assert ev["coherence"]["conditional"]["average"] == pytest.approx(mat[~np.eye(3, dtype=bool)].mean())
    assert 0.0 <= ev["coherence"]["unconditional"] <= 1.0
    assert ev["coherence"]["classifiers"]["test_accuracy"] == pytest.approx(record["test_accuracy"])
    assert ev["latent_classification"]["n_train"] == 50
    assert any("below 90% test accuracy" in n for n in ev["notes"]) == (min(record["test_accuracy"]) < 0.9)
    assert "fid" not in ev and ev["timings"]["total_s"] > 0

    # pruned.pt is preferred when present and named in the output.
    shutil.copy(run_dir / "checkpoint.pt", run_dir / "pruned.pt")
    result = CliRunner().invoke(app, ["eval", str(run_dir), "--device", "cpu", "--no-coherence", "--no-latent"])
    assert result.exit_code == 0, result.output
    ev = json.loads((run_dir / "eval.json").read_text())
    assert ev["checkpoint"] == "pruned.pt" and "coherence" not in ev and "clustering" in ev
    (run_dir / "pruned.pt").unlink()


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)


def test_eval_fid_end_to_end(tiny_run, tmp_path, no_network, monkeypatch):
    from cmvae_engine.cmvae.evaluation import fid

    run_dir, data = tiny_run
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    only_fid = {"clustering": False, "coherence": False, "latent": False, "fid": True, "device": "cpu"}
    with pytest.raises(ValueError, match="100 samples, at least 2048.*--fid-split train"):
        run_eval(EvalConfig(str(run_dir), **only_fid))  # refused before anything is loaded
    with pytest.raises(FileNotFoundError, match="--inception-weights"):
        run_eval(EvalConfig(str(run_dir), n_fid=2, fid_min_samples=2, **only_fid))

    torch.manual_seed(0)
    weights = tmp_path / fid.FID_WEIGHTS_FILE
    torch.save(fid.fid_inception_structure().state_dict(), weights)
    ev = run_eval(EvalConfig(str(run_dir), n_fid=2, fid_min_samples=2, inception_weights=str(weights), **only_fid))
    unc, cond = ev["fid"]["unconditional"], ev["fid"]["conditional"]
    assert set(unc) == {"m0", "m1", "m2", "mean"} and ev["fid"]["n_real"] == 2
    assert len([k for k in cond if "->" in k]) == 9 and np.array(cond["matrix"]).shape == (3, 3)
    values = [*unc.values(), *(v for k, v in cond.items() if "->" in k)]
    assert all(np.isfinite(v) and v > 0 for v in values)
    assert cond["m1->m2"] == cond["matrix"][1][2] and unc["mean"] == pytest.approx(np.mean([unc[f"m{i}"] for i in
                                                                                              range(3)]))
    assert json.loads((run_dir / "eval.json").read_text())["fid"]["weights"] == str(weights)
