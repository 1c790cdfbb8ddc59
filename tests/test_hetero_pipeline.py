"""Images + captions end to end through the CLI: CUBICC (fixture in the released layout) converted, trained a few steps
through the one training loop, pruned with --assign confidence, classifiers trained, evaluated, generated and
reported; and the built-in polydigits-captions set trains and names classes from the same commands."""

from __future__ import annotations

import json

import numpy as np
import torch
from cubicc_fixture import write_cubicc
from typer.testing import CliRunner

from cmvae_engine.engine.cli import app
from cmvae_engine.engine.run import load_run

FAST = ["--width", "0.0625", "-k", "4", "--z-dim", "8", "--w-dim", "4", "--batch-size", "8", "--device", "cpu",
        "--kernels", "torch", "--threads", "1", "--seed", "3"]


def invoke(args):
    res = CliRunner().invoke(app, [str(a) for a in args])
    assert res.exit_code == 0 and "Traceback" not in res.output, res.output
    return res


def test_cubicc_fixture_pipeline(tmp_path):
    src = write_cubicc(tmp_path / "CUBICC", n=30)
    data = tmp_path / "cubicc"
    invoke(["data", "convert", "cubicc", src, data])
    out = tmp_path / "run"
    invoke(["train", data, *FAST, "--family", "normal", "--objective", "dreg", "--samples", "2", "--beta", "1",
            "--max-steps", "2", "--eval-every", "1", "--out", out])
    run = load_run(out)
    specs = run.config.model.modalities
    assert [s["kind"] for s in specs] == ["image", "text"]
    assert specs[0]["likelihood_scale"] == 0.01 and specs[1]["llik_scaling"] == 5.0
    assert "test_bound" in json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    invoke(["prune", out, "--assign", "confidence", "--device", "cpu"])
    assert json.loads((out / "prune.json").read_text())["chosen_k"] >= 1
    invoke(["classifiers", "train", data, "--epochs", "1", "--device", "cpu"])
    invoke(["eval", out, "--device", "cpu", "--n-unconditional", "16", "--no-latent"])
    result = json.loads((out / "eval.json").read_text())
    assert set(result) >= {"clustering", "coherence"} and len(result["coherence"]["conditional"]["matrix"]) == 2
    invoke(["generate", out, "--n", "2", "--device", "cpu"])
    gen = json.loads((out / "generated" / "generate.json").read_text())
    assert len(gen["files"]["conditional_m0.png"]["captions"]) == 2
    invoke(["report", out])
    assert "captions as text" in (out / "report.html").read_text()


def test_polydigits_captions_trains_and_names(tmp_path):
    data = tmp_path / "pc"
    invoke(["data", "synth", "polydigits-captions", "--out", data, "--n-train", "48", "--n-valid", "16",
            "--n-test", "16"])
    out = tmp_path / "run"
    invoke(["train", data, *FAST, "--max-steps", "2", "--eval-every", "0", "--out", out])
    assert [s["kind"] for s in load_run(out).config.model.modalities] == ["image", "image", "text"]
    invoke(["eval", out, "--device", "cpu", "--no-coherence", "--no-latent"])
    naming = json.loads((out / "eval.json").read_text())["caption_naming"]
    assert set(naming["pairs"]) == {"m0->m2", "m1->m2"} and 0.0 <= naming["rate"] <= 1.0
    assert naming["n"] == 16 and len(naming["examples"]) == 8
    # every caption of the set names its class: the rule accepts the data's own captions
    from cmvae_engine.cmvae.data import read_dataset
    from cmvae_engine.cmvae.evaluation.caption_naming import caption_words, names_class

    ds = read_dataset(data)
    test = ds.split("test")
    caps = caption_words(torch.from_numpy(np.asarray(test.modalities[2])), ds.vocabs[2], 0, 1)
    assert all(names_class(c, int(y), ds.label_names) for c, y in zip(caps, test.labels, strict=True))
