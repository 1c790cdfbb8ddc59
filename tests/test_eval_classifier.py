"""Digit classifiers: the reference's key layout loads strictly, bad files are refused clearly, training
learns and writes the folder that eval finds, through the CLI too."""

import json

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from cmvae_engine.cmvae.data import read_dataset, synth_polydigits
from cmvae_engine.cmvae.evaluation.classifier import (
    DigitClassifier,
    accuracy,
    find_classifiers,
    load_classifier,
    load_classifier_folder,
    train_classifier,
    train_classifier_set,
)
from cmvae_engine.engine.cli import app

REFERENCE_KEYS = ["encoder.0.weight", "encoder.0.bias", "encoder.3.weight", "encoder.3.bias",
                  "encoder.7.weight", "encoder.7.bias", "encoder.10.weight", "encoder.10.bias"]


class _Flatten(nn.Module):
    def forward(self, x):
        return x.view(x.size(0), -1)


class ReferenceLayout(nn.Module):
    """The module the released PolyMNIST classifiers were saved from, written from DESIGN section 4: one
    Sequential `encoder` holding every layer, a parameter-free flatten between the convolutions and the MLP."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv2d(3, 10, 4, 2, 1), nn.Dropout2d(0.5), nn.ReLU(), nn.Conv2d(10, 20, 4, 2, 1), nn.Dropout2d(0.5),
            nn.ReLU(), _Flatten(), nn.Linear(980, 128), nn.Dropout(0.5), nn.ReLU(), nn.Linear(128, 10))

    def forward(self, x):
        return torch.log_softmax(self.encoder(x), dim=-1)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data") / "pd3"
    return synth_polydigits(root, n_modalities=3, n_train=200, n_valid=0, n_test=100, seed=0)


def test_reference_layout_loads_strictly(tmp_path):
    torch.manual_seed(0)
    ref = [ReferenceLayout().eval() for _ in range(3)]
    assert list(ref[0].state_dict()) == REFERENCE_KEYS
    assert list(DigitClassifier().state_dict()) == REFERENCE_KEYS
    folder = tmp_path / "PolyMNIST" / "trained_clfs_polyMNIST"
    folder.mkdir(parents=True)
    for i, m in enumerate(ref):
        torch.save(m.state_dict(), folder / f"pretrained_img_to_digit_clf_m{i}")
    data = tmp_path / "polymnist"  # the converted data set; the release sits in the raw folder beside it
    data.mkdir()
    found = find_classifiers(data, n_modalities=3)
    assert found is not None and found.kind == "pretrained" and found.folder == folder
    # Another data set in the same root never borrows PolyMNIST's classifiers.
    assert find_classifiers(data, n_modalities=3, polymnist=False) is None
    x = torch.rand(5, 3, 28, 28)
    with torch.no_grad():
        for ours, theirs in zip(found.models, ref, strict=True):
            assert torch.equal(ours(x).argmax(-1), theirs(x).argmax(-1))
            torch.testing.assert_close(torch.log_softmax(ours(x), -1), theirs(x))
    with pytest.raises(FileNotFoundError, match="pretrained_img_to_digit_clf_m3"):
        load_classifier_folder(folder, n_modalities=4)


def test_foreign_files_are_refused(tmp_path):
    state = DigitClassifier().state_dict()
    state["encoder.1.weight"] = state.pop("encoder.0.weight")
    torch.save(state, tmp_path / "renamed")
    with pytest.raises(ValueError, match="renamed.*do not match"):
        load_classifier(tmp_path / "renamed")
    (tmp_path / "garbage").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="garbage: not a readable"):
        load_classifier(tmp_path / "garbage")


def test_training_learns_a_separable_task():
    """Two classes told apart by brightness: a few dozen steps must learn them."""
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 2, (512,), generator=g)
    x = (torch.rand(512, 3, 28, 28, generator=g) * 100 + y[:, None, None, None] * 120).to(torch.uint8)
    model = train_classifier(x, y, n_classes=2, epochs=4, batch_size=64)
    assert accuracy(model, x, y) > 0.95


def test_train_set_and_cli(tiny_data, tmp_path):
    ds = read_dataset(tiny_data)
    models, record = train_classifier_set(ds.splits, dataset="pd3", epochs=1, max_steps=2, log=lambda s: None)
    assert len(models) == 3 and record["n_classes"] == 10 and record["max_steps"] == 2
    assert all(0.0 <= a <= 1.0 for a in record["test_accuracy"])
    assert find_classifiers(tiny_data, 3) is None

    result = CliRunner().invoke(app, ["classifiers", "train", str(tiny_data), "--epochs", "1", "--max-steps", "2",
                                      "--device", "cpu"])
    assert result.exit_code == 0, result.output
    meta = json.loads((tiny_data / "classifiers" / "classifiers.json").read_text())
    assert meta["n_modalities"] == 3 and len(meta["test_accuracy"]) == 3 and meta["n_test"] == 100
    found = find_classifiers(tiny_data, 3)
    assert found.kind == "trained" and found.test_accuracy == pytest.approx(meta["test_accuracy"])
    # The saved weights reproduce the recorded test accuracy.
    test = ds.split("test")
    acc = accuracy(found.models[1], torch.from_numpy(np.asarray(test.modalities[1])), torch.from_numpy(test.labels))
    assert acc == pytest.approx(meta["test_accuracy"][1])

    bad = CliRunner().invoke(app, ["classifiers", "train", str(tmp_path / "nowhere")])
    assert bad.exit_code == 2 and "nowhere" in bad.output
