"""prune, generate and report on a short CPU run of polydigits (3 modalities, reduced width, a few steps)."""

import html
import json
import re

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from cmvae_engine.cmvae.config import ModelConfig
from cmvae_engine.cmvae.data import read_dataset, synth_polydigits, write_dataset
from cmvae_engine.cmvae.model import CMVAE
from cmvae_engine.engine.checkpoint import atomic_write_json, save_checkpoint
from cmvae_engine.engine.cli import app
from cmvae_engine.engine.config import DataConfig, OptimConfig, TrainConfig
from cmvae_engine.engine.images import TITLE_HEIGHT
from cmvae_engine.engine.run import load_run
from cmvae_engine.engine.trainer import train

K = 5
runner = CliRunner()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return synth_polydigits(tmp_path_factory.mktemp("data") / "pd3", n_modalities=3, n_train=192, n_valid=48,
                            n_test=48, seed=0)


@pytest.fixture(scope="module")
def run_dir(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "tiny"
    train(TrainConfig(model=ModelConfig(n_clusters=K, z_dim=8, w_dim=4, width=0.0625),
                      data=DataConfig(dataset=str(data)), optim=OptimConfig(epochs=2, batch_size=64, max_steps=4),
                      out=str(out), log_every=2, device="cpu"))
    return out


@pytest.fixture(scope="module")
def pruned(run_dir):
    res = runner.invoke(app, ["prune", str(run_dir), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    return run_dir, json.loads((run_dir / "prune.json").read_text()), res.output


def test_prune_writes_json_plot_and_pruned_checkpoint(pruned):
    run_dir, rep, output = pruned
    assert rep["split"] == "valid" and rep["n"] == 48 and rep["beta"] == 2.5 and rep["initial_k"] == K
    assert len(rep["curve"]) == K and [e["k"] for e in rep["curve"]] == list(range(K, 0, -1))
    for key in ("pne", "entropy", "loglik", "nmi", "ari", "acc", "test_nmi", "test_ari", "test_acc"):
        assert all(isinstance(e[key], float) for e in rep["curve"]), key
    assert rep["chosen_k"] == len(rep["chosen"]) and 2 <= rep["chosen_k"] <= K
    step = next(e for e in rep["curve"] if e["active"] == rep["chosen"])
    assert rep["chosen_score"] == step["pne"]
    assert rep["improved"] == (step["pne"] < rep["baseline_score"])
    assert rep["test"]["n"] == 48 and 1 <= rep["test"]["n_clusters"] <= rep["chosen_k"]
    assert (rep["test"]["nmi"], rep["test"]["ari"], rep["test"]["acc"]) == (step["test_nmi"], step["test_ari"],
                                                                            step["test_acc"])
    assert rep["timing"]["select_s"] > 0 and rep["timing"]["total_s"] >= rep["timing"]["select_s"]
    work = rep["work"]
    assert work["reference"]["decoder_passes"] == K * 48 * 9 and work["ours"]["decoder_passes"] == 0
    assert work["network_mac_ratio"] > K
    assert f"chosen K = {rep['chosen_k']}" in output
    with Image.open(run_dir / "prune.png") as im:
        assert im.format == "PNG" and im.width > 800
    pr = load_run(run_dir, checkpoint="pruned.pt")
    assert torch.nonzero(pr.model.cluster_active).flatten().tolist() == rep["chosen"]
    assert bool(load_run(run_dir).model.cluster_active.all())  # the trained checkpoint is untouched
    trained = load_run(run_dir).model.state_dict()
    for name, value in pr.model.state_dict().items():
        if name != "cluster_active":
            assert torch.equal(value, trained[name]), name


def test_prune_options_and_errors(pruned, tmp_path):
    run_dir = pruned[0]
    res = runner.invoke(app, ["prune", str(run_dir), "--device", "cpu", "--entropy-norm", "active",
                              "--assign", "confidence", "--seed", "3"])
    assert res.exit_code == 0, res.output
    rep = json.loads((run_dir / "prune.json").read_text())
    assert (rep["entropy_norm"], rep["assign"], rep["seed"]) == ("active", "confidence", 3)
    res = runner.invoke(app, ["prune", str(run_dir), "--device", "cpu", "--assign", "mean"])
    assert res.exit_code == 2 and "--assign must be one of" in res.output
    res = runner.invoke(app, ["prune", str(tmp_path / "nothing"), "--device", "cpu"])
    assert res.exit_code == 2 and "no run folder" in res.output
    # Leave the module's run as the default prune made it.
    assert runner.invoke(app, ["prune", str(run_dir), "--device", "cpu"]).exit_code == 0


def test_prune_falls_back_to_the_test_split(data, tmp_path):
    ds = read_dataset(data)
    no_valid = write_dataset(tmp_path / "novalid", {"train": ds.splits["train"], "test": ds.splits["test"]},
                             name="novalid")
    cfg = TrainConfig(model=ModelConfig(n_modalities=3, n_clusters=3, z_dim=4, w_dim=2, width=0.0625),
                      data=DataConfig(dataset=str(no_valid)), device="cpu")
    run_dir = tmp_path / "run"
    save_checkpoint(run_dir / "checkpoint.pt", model=CMVAE(cfg.model), optimizer=None, config=cfg.to_dict(),
                    state={"epoch": 0, "step": 0})
    res = runner.invoke(app, ["prune", str(run_dir), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert "no valid split" in res.output
    rep = json.loads((run_dir / "prune.json").read_text())
    assert rep["split"] == "test" and rep["split_fallback"] and rep["n"] == 48


def png_size(path):
    with Image.open(path) as im:
        return im.size


def test_generate_grids(pruned, tmp_path):
    run_dir, rep, _ = pruned
    out = tmp_path / "gen"
    res = runner.invoke(app, ["generate", str(run_dir), "--n", "3", "--out", str(out), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    tile = 28 + 2  # save_grid: 2 pixels of padding, then everything enlarged twice
    k = rep["chosen_k"]

    def grid_size(path, cols, rows):  # the grid, a title line above it and a margin of row labels left of it
        w, h = png_size(path)
        assert h == 2 * (rows * tile + 2) + TITLE_HEIGHT and 2 * (cols * tile + 2) < w < 2 * (cols * tile + 2) + 200
        return True

    # rows: the chosen clusters; columns: 3 modalities x 3 samples and 2 blank separators
    assert grid_size(out / "unconditional.png", 11, k)
    for s in range(3):  # rows: the inputs, then 3 target modalities; columns: 3 test tuples
        assert grid_size(out / f"conditional_m{s}.png", 3, 4)
    manifest = json.loads((out / "generate.json").read_text())
    assert manifest["checkpoint"] == "pruned.pt" and sorted(manifest["clusters"]) == rep["chosen"]
    c = rep["chosen"][0]
    res = runner.invoke(app, ["generate", str(run_dir), "--n", "2", "--cluster", str(c), "--out", str(out),
                              "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert grid_size(out / f"cluster_{c}.png", 2, 3)
    manifest = json.loads((out / "generate.json").read_text())
    assert {"unconditional.png", f"cluster_{c}.png"} <= set(manifest["files"])
    gone = next(i for i in range(K) if i not in rep["chosen"]) if rep["chosen_k"] < K else K + 3
    res = runner.invoke(app, ["generate", str(run_dir), "--cluster", str(gone), "--out", str(out), "--device", "cpu"])
    assert res.exit_code == 2 and "not an active cluster" in res.output


def test_report_is_self_contained(pruned):
    run_dir, rep, _ = pruned
    assert runner.invoke(app, ["generate", str(run_dir), "--n", "2", "--device", "cpu"]).exit_code == 0
    atomic_write_json(run_dir / "eval.json", {
        "checkpoint": "pruned.pt", "split": "test", "n": 48,
        "clustering": {"vote": {"nmi": 0.8125, "ari": 0.5, "acc": 0.75, "n_clusters": 3},
                       "per_modality": {"m0": {"nmi": 0.625, "ari": 0.25, "acc": 0.5, "n_clusters": 3}}},
        "coherence": {"conditional": {"m0": {"m1": 0.4375}}, "unconditional": 0.3125},
    })
    res = runner.invoke(app, ["report", str(run_dir)])
    assert res.exit_code == 0, res.output
    page = (run_dir / "report.html").read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page, re.I)
    assert "<link" not in page and "<script" not in page
    # training curves, prune.png, recon.png, samples.png, unconditional + 3 conditional grids
    assert page.count('src="data:image/png;base64,') >= 8
    assert "reduced" in page and f"of {K}" in page and html.escape(rep["note"]) in page
    for value in ("0.812", "0.625", "0.438", "0.312"):  # eval.json numbers, shown to 3 decimals
        assert value in page
    res = runner.invoke(app, ["report", str(run_dir / "missing")])
    assert res.exit_code == 2 and "no run folder" in res.output


def test_report_shows_warnings_matrices_masses_curves_and_provenance(pruned):
    run_dir, rep, _ = pruned
    assert runner.invoke(app, ["generate", str(run_dir), "--n", "2", "--device", "cpu"]).exit_code == 0
    atomic_write_json(run_dir / "eval.json", {
        "checkpoint": "pruned.pt", "split": "test", "n": 48, "modalities": ["m0-a", "m1-b", "m2-c"],
        "timings": {"total_s": 136.4},
        "clustering": {"vote": {"nmi": 0.5, "ari": 0.25, "acc": 0.5, "n_clusters": 2}, "per_modality": {},
                       "confusion": {"clusters": [1, 4], "labels": [0, 7], "counts": [[3, 20], [25, 0]]}},
        "coherence": {"classifiers": {"kind": "trained", "folder": "x", "test_accuracy": [0.1023, 0.95, 0.97]},
                      "conditional": {"matrix": [[0.5, 0.25, 0.125], [0.75, 0.5, 0.0625], [0.3125, 0.4375, 1.0]],
                                      "average": 0.3},
                      "unconditional": 0.3125},
    })
    res = runner.invoke(app, ["report", str(run_dir)])
    assert res.exit_code == 0, res.output
    page = (run_dir / "report.html").read_text()
    # the weak-classifier warning stands above every section, outside any <details>
    alert = page.index('class="alert"')
    assert "m0 0.102" in page[alert:alert + 400] and alert < page.index("<section")
    assert "<details" not in page[:alert]
    # the coherence matrix: rows are sources, columns targets, named
    assert "source &darr; / target &rarr;" in page and "<th>m1-b</th>" in page
    assert page.index("0.062") < page.index("0.438")  # row m1 (0.0625) comes before row m2 (0.4375)
    # the confusion matrix: clusters ordered by their most frequent label (cluster 4 -> label 0 first)
    table = page[page.index("cluster &darr; / label &rarr;"):]
    assert table.index("<th>4</th>") < table.index("<th>1</th>") and ">25<" in table
    assert "Prior masses" in page and "after pruning" in page
    assert "Per step" in page and "steps.jsonl" in page  # the per-step curves
    info = json.loads((run_dir / "run_info.json").read_text())["sessions"][0]
    assert html.escape(info["command"]) in page and info["torch"] in page and "2m16s" in page  # eval's 136.4 s
    assert "BEFORE pruning" in page and "after pruning" in json.loads(
        (run_dir / "generated" / "generate.json").read_text())["files"]["unconditional.png"]["caption"]
