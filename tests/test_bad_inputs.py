"""Bad input of every kind, as a careless user gives it: each case is refused before training starts with the file
or flag named and a fix (exit 2, no traceback, the run folder untouched), or handled correctly (grey images train,
a constant modality warns). The classes: run folders, train flags, the numbers of the other commands, data
folders, checkpoints, full disks and signals. Kills at each point of the checkpoint write are in
tests/test_bad_kills.py."""

from __future__ import annotations

import errno
import hashlib
import json
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console
from test_engine_resume import _SignalAt  # a recipe that sends a signal to its own process at a step
from typer.testing import CliRunner

from cmvae_engine.cmvae.config import ModelConfig
from cmvae_engine.engine import distributed, resume, trainer
from cmvae_engine.engine.checkpoint import NotACheckpointError, load_checkpoint
from cmvae_engine.engine.cli import app
from cmvae_engine.engine.cli.train_cmd import option_fields, train_flags
from cmvae_engine.engine.config import CheckpointConfig, DataConfig, OptimConfig, TrainConfig
from cmvae_engine.engine.run import load_run
from cmvae_engine.engine.signals import Stopped
from cmvae_engine.engine.tasks import cmvae_task

QUIET = Console(quiet=True)
TINY = ["--width", "0.0625", "-k", "4", "--z-dim", "8", "--w-dim", "4", "--batch-size", "32", "--eval-every", "0",
        "--device", "cpu", "--kernels", "torch", "--threads", "1", "--seed", "5"]
README = Path(__file__).resolve().parents[1] / "README.md"


def write_raw(root: Path, modalities: list[np.ndarray | None] | None = None, *, n: int = 48, channels=(3, 3),
              size: int = 28, seed: int = 0) -> Path:
    """A data set written file by file (so that shapes our writer refuses can be written too): train n tuples,
    valid and test 16, labels 0..9. `modalities` overrides the train arrays (None: random)."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", n), ("valid", 16), ("test", 16)):
        (root / split).mkdir(parents=True, exist_ok=True)
        for k, c in enumerate(channels):
            given = modalities[k] if modalities is not None and split == "train" else None
            array = given if given is not None else rng.integers(0, 256, (count, c, size, size), dtype=np.uint8)
            np.save(root / split / f"m{k}.npy", array)
        np.save(root / split / "labels.npy", rng.integers(0, 10, count).astype(np.int64))
    return root


def snapshot(folder: Path) -> dict:
    """Every file (hidden ones too) with its size, modification time and content hash."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns,
                                         hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(folder.rglob("*")) if p.is_file()}


def invoke(args: list[str]):
    res = CliRunner().invoke(app, [str(a) for a in args])
    assert "Traceback" not in res.output, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    return res


def refused(res, code: int, *needles: str) -> None:
    text = " ".join(res.output.split())  # rich wraps long lines
    assert res.exit_code == code, res.output
    for needle in needles:
        assert " ".join(needle.split()) in text, (needle, res.output)
    if code == 2:
        assert "Fix:" in text, res.output


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_raw(tmp_path_factory.mktemp("data") / "good")


@pytest.fixture(scope="module")
def places(tmp_path_factory, data):
    """Other data sets and paths the cases point at."""
    base = tmp_path_factory.mktemp("places")
    shutil.copytree(data, base / "copy")
    write_raw(base / "other", seed=1)
    write_raw(base / "onemod", channels=(3,))
    (base / "afile").write_text("not a folder\n")
    return base


def tiny_config(data, out, **kw) -> TrainConfig:
    return TrainConfig(model=ModelConfig(n_clusters=4, z_dim=8, w_dim=4, width=0.0625),
                       data=DataConfig(dataset=str(data)), optim=OptimConfig(batch_size=32, max_steps=2),
                       ckpt=CheckpointConfig(every=1), out=str(out), eval_every=0, log_every=1, seed=5,
                       device="cpu", kernels="torch", threads=1, **kw)


@pytest.fixture(scope="module")
def finished(tmp_path_factory, data):
    """A finished run (2 steps, checkpoints at each) that the cases copy before they point at it."""
    out = tmp_path_factory.mktemp("runs") / "done"
    trainer.train(tiny_config(data, out), QUIET)
    return out


@pytest.fixture
def run(tmp_path, finished):
    copy = tmp_path / "run"
    shutil.copytree(finished, copy)
    return copy


# ----- run folders: refused with the three ways out, and nothing touched ---------------------------------------
RUN_CASES = {
    # id: (arguments, exit code, what the message must say)
    "train into a finished run": (["train", "{data}", *TINY, "--out", "{run}"], 2,
                                  ["{run} already holds a run", "--resume", "--overwrite", "another --out"]),
    "train into a run, with bad data": (["train", "{onemod}", *TINY, "--out", "{run}"], 2, ["already holds a run"]),
    "overwrite, but one modality": (["train", "{onemod}", *TINY, "--overwrite", "--out", "{run}"], 2,
                                    ["1 modality", "at least 2", "m1.npy"]),
    "overwrite, but a bad flag": (["train", "{data}", *TINY, "--overwrite", "--z-dim", "0", "--out", "{run}"], 2,
                                  ["--z-dim (model.z_dim)", "got 0"]),
    "overwrite, but a missing data set": (["train", "{places}/nowhere", *TINY, "--overwrite", "--out", "{run}"], 2,
                                          ["nowhere", "no such folder"]),
    "resume and overwrite": (["train", "--resume", "--overwrite", "--out", "{run}"], 2, ["contradict"]),
    "resume and config": (["train", "--resume", "--config", "{run}/config.json", "--out", "{run}"], 2,
                          ["--config and --resume"]),
    "resume --clusters 40 (the default) on K=4": (["train", "--resume", "--clusters", "40", "--out", "{run}"], 2,
                                                  ["--clusters (model.n_clusters) = 4", "asks for 40"]),
    "resume --seed 0 (the default) on seed 5": (["train", "--resume", "--seed", "0", "--out", "{run}"], 2,
                                                ["--seed (seed) = 5"]),
    "resume --z-dim 32 (the default)": (["train", "--resume", "--z-dim", "32", "--out", "{run}"], 2,
                                        ["--z-dim (model.z_dim) = 8"]),
    "resume --no-amsgrad": (["train", "--resume", "--no-amsgrad", "--out", "{run}"], 2,
                            ["--amsgrad/--no-amsgrad (optim.amsgrad) = True"]),
    "resume --objective dreg": (["train", "--resume", "--objective", "dreg", "--out", "{run}"], 2,
                                ["(objective) = 'iwae'"]),
    "resume another DATASET": (["train", "{places}/other", "--resume", "--out", "{run}"], 2,
                               ["trained on DATASET '{data}'", "{places}/other"]),
    "resume with a bad flag value": (["train", "--resume", "--max-steps", "0", "--out", "{run}"], 2,
                                     ["--max-steps (optim.max_steps)"]),
    "resume at the last step: nothing to do": (["train", "--resume", "--out", "{run}"], 0,
                                               ["nothing to do", "nothing was changed"]),
    "resume from a copy of the data set, nothing left to do": (
        ["train", "{places}/copy", "--resume", "--epochs", "1", "--out", "{run}"], 0, ["nothing to do"]),
}


@pytest.mark.parametrize("case", list(RUN_CASES))
def test_run_folders_are_never_lost(case, run, data, places):
    args, code, needles = RUN_CASES[case]
    fill = {"run": run, "data": data, "places": places, "onemod": places / "onemod"}
    before = snapshot(run)
    res = invoke([a.format(**fill) for a in args])
    refused(res, code, *(n.format(**fill) for n in needles))
    assert snapshot(run) == before


def test_a_folder_with_only_metrics_is_a_run_and_out_may_not_be_a_file(tmp_path, data, places):
    out = tmp_path / "m"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"epoch": 1}\n')
    before = snapshot(out)
    refused(invoke(["train", data, *TINY, "--out", out]), 2, "already holds a run", "metrics.jsonl")
    assert snapshot(out) == before
    refused(invoke(["train", data, *TINY, "--out", places / "afile"]), 2, "is a file, not a folder")
    assert (places / "afile").read_text() == "not a folder\n"
    refused(invoke(["train", data, "--resume", "--out", tmp_path / "empty"]), 2, "no checkpoint in")
    assert not (tmp_path / "empty").exists()


def test_the_resolved_kernel_backend_is_recorded_and_a_switch_is_reported(run):
    assert json.loads((run / "config.json").read_text())["kernels"] == {"requested": "torch", "device": "cpu",
                                                                        "backend": "torch"}
    assert load_checkpoint(run / "ckpt-00000002.pt")["run"]["kernels"]["backend"] == "torch"
    for name in ("ckpt-00000002.pt", "checkpoint.pt"):  # as if trained where `auto` resolved to the extension
        payload = torch.load(run / name, weights_only=True)
        info = json.loads(payload["run"])
        info["kernels"]["backend"] = "ext"
        payload["run"] = json.dumps(info)
        torch.save(payload, run / name)
    res = invoke(["train", "--resume", "--max-steps", "3", "--out", run])
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    assert "this run trained with the ext fused-op backend on cpu; this process resolves --kernels torch to torch" \
        in text


def test_overwrite_replaces_the_old_run_only_once_the_new_one_is_checked(run, data):
    (run / "pruned.pt").write_bytes((run / "checkpoint.pt").read_bytes())
    (run / "eval.json").write_text("{}")
    (run / "notes.txt").write_text("mine")  # not a run file: kept
    res = invoke(["train", data, *TINY, "--max-steps", "1", "--overwrite", "--out", run])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in run.glob("ckpt-*.pt")) == ["ckpt-00000001.pt"]  # the old ckpt-2 is gone
    assert not (run / "pruned.pt").exists() and not (run / "eval.json").exists()
    assert (run / "notes.txt").read_text() == "mine"
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1


# ----- train flags: every number and choice, from the command line and from files ---------------------------
FLAG_CASES = {
    # id: (flags, the flag named in the message)
    "z-dim 0": (["--z-dim", "0"], "--z-dim"), "z-dim -3": (["--z-dim", "-3"], "--z-dim"),
    "z-dim huge": (["--z-dim", "100000"], "--z-dim"), "w-dim 0": (["--w-dim", "0"], "--w-dim"),
    "clusters 0": (["--clusters", "0"], "--clusters"), "max-steps 0": (["--max-steps", "0"], "--max-steps"),
    "max-steps -1": (["--max-steps", "-1"], "--max-steps"), "epochs 0": (["--epochs", "0"], "--epochs"),
    "batch-size 0": (["--batch-size", "0"], "--batch-size"), "lr 0": (["--lr", "0"], "--lr"),
    "lr -1": (["--lr", "-1"], "--lr"), "lr nan": (["--lr", "nan"], "--lr"), "lr inf": (["--lr", "inf"], "--lr"),
    "beta -1": (["--beta", "-1"], "--beta"), "beta nan": (["--beta", "nan"], "--beta"),
    "samples 0": (["--samples", "0"], "--samples"), "width 0": (["--width", "0"], "--width"),
    "width nan": (["--width", "nan"], "--width"), "width 100": (["--width", "100"], "--width"),
    "log-every 0": (["--log-every", "0"], "--log-every"), "eval-every -1": (["--eval-every", "-1"], "--eval-every"),
    "threads 0": (["--threads", "0"], "--threads"), "workers -1": (["--workers", "-1"], "--workers"),
    "shuffle-buffer -1": (["--shuffle-buffer", "-1"], "--shuffle-buffer"),
    "checkpoint-every -1": (["--checkpoint-every", "-1"], "--checkpoint-every"), "keep 0": (["--keep", "0"], "--keep"),
    "nproc 0": (["--nproc", "0"], "--nproc"), "seed -1": (["--seed", "-1"], "--seed"),
    "seed 2^40": (["--seed", str(2**40)], "--seed"),
    "device gpu": (["--device", "gpu"], "--device"), "device cuda:x": (["--device", "cuda:x"], "--device"),
    "family gauss": (["--family", "gauss"], "--family"), "objective elbo": (["--objective", "elbo"], "--objective"),
    "recipe fastest": (["--recipe", "fastest"], "--recipe"), "model vae": (["--model", "vae"], "--model"),
    "loader nope": (["--loader", "nope"], "--loader"), "amp-dtype fp8": (["--amp-dtype", "fp8"], "--amp-dtype"),
    "kernels fast": (["--kernels", "fast"], "--kernels"),
    "fast-set check_every=0": (["--fast-set", "check_every=0"], "check_every"),
    "fast-set contrast_tau=nan": (["--fast-set", "contrast_tau=nan"], "contrast_tau"),
    "fast-set unknown key": (["--fast-set", "nope=1"], "--fast-set"),
    "fast-set not a number": (["--fast-set", "check_every=x"], "--fast-set"),
    "fast-disable unknown": (["--fast-disable", "bogus"], "--fast-disable"),
    "cuda-graphs without compile": (["--cuda-graphs"], "--cuda-graphs"),
    "nproc not dividing the batch": (["--nproc", "3"], "divisible by --nproc 3"),
    "batch larger than the data with drop-last": (["--batch-size", "64", "--drop-last"], "--batch-size of at most 48"),
}


@pytest.mark.parametrize("case", list(FLAG_CASES))
def test_bad_train_flags_are_refused_naming_the_flag(case, data, tmp_path):
    flags, named = FLAG_CASES[case]
    out = tmp_path / "out"
    res = invoke(["train", data, *TINY, *flags, "--out", out])
    refused(res, 2, named)
    assert not out.exists()  # refused before the run folder was created


def test_missing_dataset_and_bad_config_files(tmp_path, finished):
    refused(invoke(["train", *TINY]), 2, "missing DATASET", "--config RUN/config.json")
    refused(invoke(["train", "--config", tmp_path / "none.json"]), 2, "none.json", "no such file")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    refused(invoke(["train", "--config", bad]), 2, "bad.json", "not valid JSON")
    saved = json.loads((finished / "config.json").read_text())
    for field, value, needle in (("lrr", 1, "unknown field 'lrr'"), ("epochs", "3", "--epochs (optim.epochs)")):
        edited = json.loads(json.dumps(saved))
        edited["config"]["optim"][field] = value
        bad.write_text(json.dumps(edited))
        refused(invoke(["train", "--config", bad, "--out", tmp_path / "x"]), 2, "bad.json", needle)
    assert not (tmp_path / "x").exists()


def test_config_reruns_a_saved_run_with_the_flags_given_on_top(tmp_path, finished):
    out = tmp_path / "again"
    res = invoke(["train", "--config", finished / "config.json", "--max-steps", "1", "--no-amsgrad", "--out", out])
    assert res.exit_code == 0, res.output
    got, saved = (json.loads((p / "config.json").read_text())["config"] for p in (out, finished))
    assert got["optim"]["max_steps"] == 1 and got["optim"]["amsgrad"] is False
    assert got["model"] == saved["model"] and got["seed"] == saved["seed"] == 5  # the rest is the saved run's
    # without --out it would train into the saved run's own folder: refused like any other train into a run
    refused(invoke(["train", "--config", finished / "config.json"]), 2, "already holds a run")


def test_every_train_flag_sets_a_config_field_and_the_readme_defaults_have_flags():
    import inspect

    params = [p for p in inspect.signature(train_flags).parameters if p != "ctx"]
    fields = option_fields()
    assert sorted(set(params) - set(fields)) == ["config"]  # --config is not a setting but where they come from
    defaults, signature = TrainConfig().to_dict(), inspect.signature(train_flags).parameters
    for option, dotted in fields.items():
        if dotted in ("fast", "data.dataset", "model", "model.n_facets"):  # model: --mfcvae-set; n_facets: mfcvae's
            continue
        node = defaults
        for part in dotted.split("."):
            node = node[part]
        # the flag's default is the field's (--clusters is text: K, or K1,K2 for mfcvae)
        assert signature[option].default == node or str(signature[option].default) == str(node), (option, dotted)
    # The README's list of reference defaults: each has its flag, whose default is that value.
    row = next(line for line in README.read_text().splitlines() if line.startswith("| `cmvae-engine train DATASET`"))
    pairs = dict(_flag_pairs(row))
    reference = ("--amsgrad", "--lr", "--batch-size", "--beta", "--clusters", "--z-dim", "--w-dim", "--family",
                 "--objective", "--samples", "--epochs")
    assert set(reference) <= set(pairs), row
    for flag in reference:
        value = pairs[flag]
        default = signature[flag.lstrip("-").replace("-", "_")].default
        assert str(default).lower() == value or (isinstance(default, float) and default == float(value)), flag


def _flag_pairs(text: str):
    import re

    for flag, value in re.findall(r"`(--[a-z-]+)(?: ([^`]+))?`", text):
        yield flag, value or "true"


# ----- the other commands' numbers ------------------------------------------------------------------------------
COMMAND_CASES = {
    # id: (arguments, the flag named)
    "prune --batch-size 0": (["prune", "{run}", "--batch-size", "0"], "--batch-size"),
    "prune --threads 0": (["prune", "{run}", "--threads", "0"], "--threads"),
    "prune --seed -1": (["prune", "{run}", "--seed", "-1"], "--seed"),
    "prune --assign x": (["prune", "{run}", "--assign", "x"], "--assign"),
    "prune --entropy-norm x": (["prune", "{run}", "--entropy-norm", "x"], "--entropy-norm"),
    "prune --split x": (["prune", "{run}", "--split", "x"], "--split"),
    "eval --batch-size 0": (["eval", "{run}", "--batch-size", "0", "--no-coherence"], "--batch-size"),
    "eval --threads 0": (["eval", "{run}", "--threads", "0", "--no-coherence"], "--threads"),
    "eval --split x": (["eval", "{run}", "--split", "x", "--no-coherence"], "--split"),
    "eval --seed -1": (["eval", "{run}", "--seed", "-1", "--no-coherence"], "--seed"),
    "generate --n 0": (["generate", "{run}", "--n", "0"], "--n"),
    "generate --seed -1": (["generate", "{run}", "--seed", "-1"], "--seed"),
    "generate --cluster 99": (["generate", "{run}", "--cluster", "99"], "--cluster"),
    "data synth --modalities 1": (["data", "synth", "polydigits", "--out", "{tmp}/s", "--modalities", "1"],
                                  "--modalities"),
    "data convert --seed -1": (["data", "convert", "polymnist", "{tmp}/raw", "{tmp}/conv", "--seed", "-1"], "--seed"),
    "data synth --n-train 0": (["data", "synth", "polydigits", "--out", "{tmp}/s", "--n-train", "0"], "--n-train"),
    "data synth --n-valid -1": (["data", "synth", "polydigits", "--out", "{tmp}/s", "--n-valid", "-1"], "--n-valid"),
    "data synth --seed -1": (["data", "synth", "polydigits", "--out", "{tmp}/s", "--seed", "-1"], "--seed"),
    "data grid --n 0": (["data", "grid", "{data}", "--out", "{tmp}/g.png", "--n", "0"], "--n"),
    "data grid --scale 0": (["data", "grid", "{data}", "--out", "{tmp}/g.png", "--scale", "0"], "--scale"),
    "data shard --tuples-per-shard 0": (["data", "shard", "{data}", "{tmp}/sh", "--tuples-per-shard", "0"],
                                        "--tuples-per-shard"),
    "classifiers train --epochs 0": (["classifiers", "train", "{data}", "--out", "{tmp}/c", "--epochs", "0"],
                                     "--epochs"),
    "classifiers train --batch-size 0": (["classifiers", "train", "{data}", "--out", "{tmp}/c", "--batch-size", "0"],
                                         "--batch-size"),
    "classifiers train --lr 0": (["classifiers", "train", "{data}", "--out", "{tmp}/c", "--lr", "0"], "--lr"),
    "classifiers train --max-steps 0": (["classifiers", "train", "{data}", "--out", "{tmp}/c", "--max-steps", "0"],
                                        "--max-steps"),
    "bench train --steps 0": (["bench", "train", "{data}", "--steps", "0", "--out", "{tmp}/b"], "--steps"),
    "bench kernels --threads 0": (["bench", "kernels", "--threads", "0", "--tiny", "--out", "{tmp}/b"], "--threads"),
    "profile --steps 0": (["profile", "{data}", "--steps", "0", "--out", "{tmp}/p"], "--steps"),
    "profile --warmup -1": (["profile", "{data}", "--warmup", "-1", "--out", "{tmp}/p"], "--warmup"),
}


@pytest.mark.parametrize("case", list(COMMAND_CASES))
def test_bad_numbers_of_every_command_are_refused_naming_the_flag(case, finished, data, tmp_path):
    args, named = COMMAND_CASES[case]
    before = snapshot(finished)
    res = invoke([a.format(run=finished, data=data, tmp=tmp_path) for a in args])
    refused(res, 2, named)
    assert snapshot(finished) == before
    assert not any(tmp_path.iterdir())  # nothing written


# ----- data folders ---------------------------------------------------------------------------------------------
def _grey_rgb(root: Path) -> Path:
    return write_raw(root, channels=(1, 3))


DATA_CASES = {
    # id: (how to make the folder, extra flags, what the message must say)
    "4-channel images": (lambda r: write_raw(r, channels=(4, 4)), [], ["4 channels", "m0.npy", "x[:, :3]"]),
    "2-channel images": (lambda r: write_raw(r, channels=(2, 2)), [], ["2 channels", "grey or RGB"]),
    "modalities with different channels": (_grey_rgb, [], ["different channel counts", "m0.npy: 1", "m1.npy: 3",
                                                            "np.repeat"]),
    "one modality (cmvae)": (lambda r: write_raw(r, channels=(3,)), [], ["holds 1 modality", "at least 2", "m1.npy"]),
    "one modality (mmvaeplus)": (lambda r: write_raw(r, channels=(3,)), ["--model", "mmvaeplus"],
                                 ["mmvaeplus is a multimodal model"]),
    "48x48 images": (lambda r: write_raw(r, size=48), [], ["48x48", "28x28"]),
    "float images": (lambda r: write_raw(r, [np.zeros((48, 3, 28, 28), np.float32), None]), [], ["m0.npy", "uint8"]),
    "no such folder": (lambda r: None, [], ["no such folder", "cmvae-engine data synth polydigits"]),
    "a file, not a folder": (lambda r: r.write_text("x"), [], ["no such folder"]),
}


@pytest.mark.parametrize("case", list(DATA_CASES))
def test_data_the_model_cannot_take_is_refused_before_training(case, tmp_path):
    make, flags, needles = DATA_CASES[case]
    root = tmp_path / "ds"
    make(root)
    out = tmp_path / "out"
    refused(invoke(["train", root, *TINY, *flags, "--out", out]), 2, str(root), *needles)
    assert not out.exists()


def test_grey_images_train_end_to_end(tmp_path):
    root = write_raw(tmp_path / "grey", channels=(1, 1))
    out = tmp_path / "run"
    res = invoke(["train", root, *TINY, "--eval-every", "1", "--max-steps", "2", "--out", out])
    assert res.exit_code == 0, res.output
    run = load_run(out)
    assert run.config.model.image_channels == 1
    x = torch.rand(2, 3, 1, 28, 28)
    assert run.model.reconstruct(x).shape == x.shape
    assert run.model.generate(2, cluster=0).shape == (2, 2, 1, 28, 28)
    assert "test_bound" in json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert (out / "samples.png").stat().st_size > 0
    res = invoke(["generate", out, "--n", "2", "--device", "cpu"])
    assert res.exit_code == 0, res.output


def test_a_constant_modality_warns_naming_the_file(tmp_path):
    root = write_raw(tmp_path / "flat", [np.zeros((48, 3, 28, 28), np.uint8), None])
    res = invoke(["train", root, *TINY, "--max-steps", "1", "--out", tmp_path / "run"])
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    assert "warning:" in text and f"{root}/train/m0.npy: every pixel of every image is 0" in text


# ----- checkpoints ----------------------------------------------------------------------------------------------
def _real(finished: Path) -> dict:
    return torch.load(finished / "checkpoint.pt", weights_only=True)


def _with(finished: Path, **changes) -> dict:
    payload = _real(finished)
    payload.update(changes)
    return payload


def _config_with(finished: Path, section: str, key: str, value) -> dict:
    payload = _real(finished)
    config = json.loads(payload["config"])
    config[section][key] = value
    payload["config"] = json.dumps(config)
    return payload


def _save(path: Path, obj) -> None:
    torch.save(obj, path)


CHECKPOINT_CASES = {
    # id: (how to write the bad file, what the message must say)
    "a bare tensor": (lambda p, f: _save(p, torch.zeros(3)), "it holds a Tensor"),
    "a bare state_dict": (lambda p, f: _save(p, _real(f)["model"]), "a bare state_dict"),
    "another program's dict": (lambda p, f: _save(p, {"epoch": 3, "weights": {}}), "without the fields"),
    "config not text": (lambda p, f: _save(p, _with(f, config={"model": {}})), "not the JSON text"),
    "config not JSON": (lambda p, f: _save(p, _with(f, config="{nope")), "not valid JSON"),
    "config of another program": (lambda p, f: _save(p, _with(f, config=json.dumps({"lr": 0.1}))),
                                  "section 'model' is missing"),
    "config of another model kind": (lambda p, f: _save(p, _config_with(f, "model", "kind", "vae")),
                                     "unknown model kind 'vae'"),
    "config with a bad value": (lambda p, f: _save(p, _config_with(f, "model", "z_dim", 0)), "--z-dim"),
    "config with an unknown field": (lambda p, f: _save(p, _config_with(f, "optim", "momentum", 0.9)),
                                     "unknown field 'momentum'"),
    "weights of another architecture": (lambda p, f: _save(p, _config_with(f, "model", "width", 0.125)),
                                        "weights do not fit"),
    "model not a state dict": (lambda p, f: _save(p, _with(f, model=[1, 2])), "not a state dict"),
    "state not an object": (lambda p, f: _save(p, _with(f, state="[1]")), "not an object"),
    "truncated": (lambda p, f: p.write_bytes((f / "checkpoint.pt").read_bytes()[:5000]), "cannot be read"),
    "empty file": (lambda p, f: p.write_bytes(b""), "cannot be read"),
    "a pickled object": (lambda p, f: _save(p, {"model": {}, "config": "{}", "state": "{}", "x": Path("a")}),
                         "cannot be read"),
}


@pytest.mark.parametrize("case", list(CHECKPOINT_CASES))
def test_foreign_and_damaged_checkpoints_are_named_not_ours(case, tmp_path, finished):
    make, needle = CHECKPOINT_CASES[case]
    run = tmp_path / "run"
    run.mkdir()
    make(run / "checkpoint.pt", finished)
    with pytest.raises(NotACheckpointError) as info:
        load_run(run)
    message = str(info.value)
    assert f"{run / 'checkpoint.pt'} is not a cmvae-engine checkpoint" in message and needle in message, message
    assert "Fix:" in message
    # what prune, eval and generate say: one clean line, exit 2
    refused(invoke(["generate", run, "--n", "1", "--device", "cpu"]), 2, "is not a cmvae-engine checkpoint", needle)


def test_resume_refuses_a_run_whose_checkpoints_are_all_foreign(tmp_path, data):
    run = tmp_path / "run"
    run.mkdir()
    torch.save(torch.zeros(3), run / "checkpoint.pt")
    before = snapshot(run)
    refused(invoke(["train", data, "--resume", "--out", run]), 2, "no checkpoint in", "can be loaded",
            "it holds a Tensor")
    assert snapshot(run) == before
    for command in (["prune", run], ["eval", run, "--no-coherence"]):  # generate: in the table above
        refused(invoke([*command, "--device", "cpu"]), 2, f"{run / 'checkpoint.pt'} is not a cmvae-engine checkpoint")
    assert snapshot(run) == before
    with pytest.raises(NotACheckpointError, match="is a folder"):
        load_checkpoint(run)


# ----- full disk ------------------------------------------------------------------------------------------------
def _disk_full_at(point: str, write: int):
    calls = {"n": 0}

    def fault(where: str) -> None:
        calls["n"] += where == "tmp-open"
        if where == point and calls["n"] == write:
            raise OSError(errno.ENOSPC, "No space left on device")

    return fault


def test_a_full_disk_during_a_checkpoint_says_what_was_kept(tmp_path, data, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setattr(resume, "_FAULT", _disk_full_at("tmp-half", write=2))
    res = invoke(["train", data, *TINY, "--checkpoint-every", "1", "--max-steps", "3", "--out", out])
    refused(res, 1, "no space left on the device", "ckpt-00000002.pt", "MB needed",
            f"the last good checkpoint is kept: {out}/ckpt-00000001.pt (step 1)", "--resume")
    assert sorted(p.name for p in out.iterdir() if p.name.startswith((".", "ckpt"))) == ["ckpt-00000001.pt"]
    monkeypatch.setattr(resume, "_FAULT", None)
    res = invoke(["train", "--resume", "--out", out])  # space freed: continue
    assert res.exit_code == 0, res.output
    assert load_checkpoint(out / "checkpoint.pt")["state"]["step"] == 3


def test_a_full_disk_while_appending_metrics_says_what_was_kept(tmp_path, data, monkeypatch):
    out = tmp_path / "run"

    def full(folder, row):
        raise OSError(errno.EDQUOT, "Disk quota exceeded", str(folder / "metrics.jsonl"))

    monkeypatch.setattr(resume, "append_metrics", full)
    res = invoke(["train", data, *TINY, "--checkpoint-every", "1", "--max-steps", "2", "--out", out])
    refused(res, 1, "while writing metrics.jsonl", "Disk quota exceeded", "ckpt-00000001.pt (step 1)")


# ----- signals: a distinct exit code -----------------------------------------------------------------------------
@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_exits_with_128_plus_its_number_after_a_checkpoint(signum, code, tmp_path, data, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setattr(cmvae_task, "build_recipe", lambda name, fast=None, beta=2.5: _SignalAt(1, signum))
    res = invoke(["train", data, *TINY, "--max-steps", "2", "--out", out])
    refused(res, code, f"stopped by {signal.Signals(signum).name} at step 1", "--resume")
    assert load_checkpoint(out / "checkpoint.pt")["state"]["step"] == 1


def test_data_parallel_workers_report_a_stop_and_the_launcher_raises_it(tmp_path, data, monkeypatch):
    """The worker side in-process (a real stop written to its result file), the launcher side from that file."""
    out = tmp_path / "run"
    cfg_path = tmp_path / "launch" / "config.json"
    cfg_path.parent.mkdir()
    cfg_path.write_text(json.dumps(tiny_config(data, out).to_dict()))
    monkeypatch.setattr(cmvae_task, "build_recipe", lambda name, fast=None, beta=2.5: _SignalAt(1, signal.SIGTERM))
    distributed._worker(str(cfg_path))
    result = json.loads((cfg_path.parent / "result-0.json").read_text())
    assert result["stopped"] == signal.SIGTERM and result["step"] == 1
    monkeypatch.setattr(distributed, "launch", lambda cfg, n: (1, signal.SIGTERM, result))
    cfg = tiny_config(data, tmp_path / "other", nproc=2)
    with pytest.raises(Stopped) as stopped:
        trainer._launch(cfg, QUIET)
    assert stopped.value.exit_code == 143
