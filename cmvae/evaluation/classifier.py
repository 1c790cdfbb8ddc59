"""Digit classifiers for coherence (DESIGN section 4): the architecture, a training loop, and loading of
either the PolyMNIST pretrained files or classifiers trained by `cmvae-engine classifiers train`."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cmvae_engine.cmvae.clustering import to_float
from cmvae_engine.cmvae.progress import ProgressFn, batches, report, shifted

PRETRAINED_DIR = "trained_clfs_polyMNIST"
PRETRAINED_FILE = "pretrained_img_to_digit_clf_m{}"
OWN_DIR = "classifiers"
OWN_FILE = "m{}.pt"
OWN_META = "classifiers.json"
WEAK_ACCURACY = 0.9
"""Below this test accuracy a classifier is flagged as weak: coherence measured with it is bounded by it."""


class DigitClassifier(nn.Module):
    """Conv(C->10,k4,s2,p1), Dropout2d(.5), ReLU, Conv(10->20,k4,s2,p1), Dropout2d(.5), ReLU,
    Linear(980->128), Dropout(.5), ReLU, Linear(128->classes); 28x28 inputs in [0, 1], logits out.

    All layers sit in ONE Sequential named `encoder`, in this order, with the flatten as element 6: that is
    the reference's module, so its released weights have exactly the keys encoder.{0,3,7,10}.{weight,bias}
    and load strictly.
    """

    def __init__(self, in_channels: int = 3, n_classes: int = 10):
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv2d(in_channels, 10, kernel_size=4, stride=2, padding=1),
            nn.Dropout2d(0.5),
            nn.ReLU(),
            nn.Conv2d(10, 20, kernel_size=4, stride=2, padding=1),
            nn.Dropout2d(0.5),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(980, 128),
            nn.Dropout(0.5),
            nn.ReLU(),
            nn.Linear(128, n_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)


@dataclass
class ClassifierSet:
    """One trained classifier per modality, in eval mode."""

    models: list[DigitClassifier]
    kind: str
    """`pretrained` (the PolyMNIST release) or `trained` (by `cmvae-engine classifiers train`)."""
    folder: Path
    test_accuracy: list[float] | None = None
    """Per-modality test accuracy recorded at training time (ours only)."""

    def to(self, device: torch.device | str) -> ClassifierSet:
        self.models = [m.to(device).eval() for m in self.models]
        return self

    def describe(self) -> dict:
        return {"kind": self.kind, "folder": str(self.folder), "test_accuracy": self.test_accuracy}


def weak_classifiers(accuracy: list[float] | None, n_classes: int = 10) -> str | None:
    """A warning naming the classifiers below WEAK_ACCURACY (and those near chance), or None when all are fine."""
    weak = [(m, a) for m, a in enumerate(accuracy or []) if not a >= WEAK_ACCURACY]
    if not weak:
        return None
    chance = 1.0 / n_classes
    listed = ", ".join(f"m{m} {a:.3f}" + (" at chance" if a < 2 * chance else "") for m, a in weak)
    return (f"weak digit classifiers ({listed}): below {WEAK_ACCURACY:.0%} test accuracy (chance "
            f"{chance:.2f}); coherence measured with them says little about the model. Retrain them with more "
            "epochs: `cmvae-engine classifiers train DATASET --epochs 10`")


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, batch_size: int = 2048) -> torch.Tensor:
    """Labels [N] for images [N, C, H, W] (uint8, or float in [0, 1]) on the model's device."""
    device = next(model.parameters()).device
    out = [model(to_float(images[i:i + batch_size].to(device))).argmax(-1) for i in range(0, len(images), batch_size)]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long, device=device)


# ----- loading ---------------------------------------------------------------------------------------


def load_classifier(path: str | Path, *, in_channels: int = 3, n_classes: int = 10) -> DigitClassifier:
    """A classifier from a state-dict file in the reference's layout (strict, weights_only)."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: not a readable state-dict file ({e}); re-download it or retrain with "
                         "`cmvae-engine classifiers train DATASET`") from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a state dict (names -> tensors) of the digit classifier")
    model = DigitClassifier(in_channels, n_classes)
    expected = set(model.state_dict())
    if set(state) != expected or any(state[k].shape != v.shape for k, v in model.state_dict().items()):
        shapes = {k: tuple(v.shape) for k, v in state.items()}
        raise ValueError(f"{path}: its tensors {shapes} do not match the digit classifier "
                         f"(expected {sorted(expected)} for {in_channels} channels and {n_classes} classes)")
    model.load_state_dict(state, strict=True)
    return model.eval()


def classifier_search_dirs(data_folder: Path, polymnist: bool = True) -> list[Path]:
    """Where the PolyMNIST release may have put its classifiers relative to our data folder: the folder
    itself, and for PolyMNIST also the raw `PolyMNIST` folder next to it and the data root. Other data sets
    look only in their own folder, so PolyMNIST's classifiers never score another data set's images."""
    data_folder = Path(data_folder)
    if not polymnist:
        return [data_folder]
    dirs = [data_folder, data_folder / "PolyMNIST", data_folder.parent, data_folder.parent / "PolyMNIST"]
    return list(dict.fromkeys(dirs))


def load_classifier_folder(folder: str | Path, n_modalities: int, in_channels: int = 3) -> ClassifierSet:
    """Classifiers from a folder in either layout: ours (`m{i}.pt` + `classifiers.json`) or the PolyMNIST
    release (`pretrained_img_to_digit_clf_m{i}`, or a folder holding `trained_clfs_polyMNIST/`)."""
    folder = Path(folder)
    if (folder / OWN_META).is_file():
        meta = json.loads((folder / OWN_META).read_text())
        n_classes, acc = int(meta.get("n_classes", 10)), meta.get("test_accuracy")
        files = [folder / OWN_FILE.format(i) for i in range(n_modalities)]
        kind = "trained"
    else:
        if (folder / PRETRAINED_DIR).is_dir():
            folder = folder / PRETRAINED_DIR
        n_classes, acc = 10, None
        files = [folder / PRETRAINED_FILE.format(i) for i in range(n_modalities)]
        kind = "pretrained"
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"{folder}: missing classifier files {missing} for {n_modalities} modalities")
    if acc is not None and len(acc) < n_modalities:
        raise ValueError(f"{folder / OWN_META}: records {len(acc)} modalities, the model has {n_modalities}")
    archs = meta.get("architectures") if kind == "trained" else None
    if archs is not None:  # images of other sizes, captions
        models = [_load_built(f, a, n_classes) for f, a in zip(files, archs, strict=False)]
    else:
        models = [load_classifier(f, in_channels=in_channels, n_classes=n_classes) for f in files]
    return ClassifierSet(models, kind, folder, None if acc is None else [float(a) for a in acc[:n_modalities]])


def _load_built(path: Path, arch: dict, n_classes: int) -> nn.Module:
    from cmvae_engine.cmvae.evaluation.modality_classifiers import build_classifier

    model = build_classifier(arch, n_classes)
    try:
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    except Exception as e:
        raise ValueError(f"{path}: does not hold the {arch['kind']} classifier classifiers.json describes ({e}); "
                         "retrain with `cmvae-engine classifiers train DATASET`") from e
    return model.eval()


def find_classifiers(data_folder: str | Path, n_modalities: int, in_channels: int = 3, *,
                     polymnist: bool = True) -> ClassifierSet | None:
    """The PolyMNIST pretrained classifiers when present near the data (`polymnist`: the data set is
    PolyMNIST), else ours from `{data}/classifiers`, else None."""
    data_folder = Path(data_folder)
    for d in classifier_search_dirs(data_folder, polymnist):
        pre = d / PRETRAINED_DIR
        if all((pre / PRETRAINED_FILE.format(i)).is_file() for i in range(n_modalities)):
            return load_classifier_folder(pre, n_modalities, in_channels)
    own = data_folder / OWN_DIR
    if (own / OWN_META).is_file():
        return load_classifier_folder(own, n_modalities, in_channels)
    return None


# ----- training --------------------------------------------------------------------------------------


def train_classifier(
    images: torch.Tensor, labels: torch.Tensor, *, n_classes: int, epochs: int, batch_size: int = 128,
    lr: float = 1e-3, device: torch.device | str = "cpu", seed: int = 0, max_steps: int | None = None,
    progress: ProgressFn | None = None, architecture: dict | None = None,
) -> DigitClassifier:
    """Adam + cross-entropy on uint8 images [N, C, H, W] kept on the device; a fresh permutation per epoch.
    `progress`: (steps done, steps)."""
    device = torch.device(device)
    torch.manual_seed(seed)
    if architecture is not None:  # images of other sizes, captions (modality_classifiers.py)
        from cmvae_engine.cmvae.evaluation.modality_classifiers import build_classifier

        model = build_classifier(architecture, n_classes).to(device).train()
    else:
        model = DigitClassifier(images.shape[1], n_classes).to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    x_all, y_all = images.to(device), labels.to(device)
    g = torch.Generator(device=device).manual_seed(seed)
    step = 0
    total = epochs * batches(len(x_all), batch_size)
    total = min(total, max_steps) if max_steps is not None else total
    for _ in range(epochs):
        perm = torch.randperm(len(x_all), generator=g, device=device)
        for i in range(0, len(perm), batch_size):
            idx = perm[i:i + batch_size]
            loss = F.cross_entropy(model(to_float(x_all[idx])), y_all[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            report(progress, step, total)
            if max_steps is not None and step >= max_steps:
                return model.eval()
    return model.eval()


def accuracy(model: DigitClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    pred = predict(model, images).cpu()
    return float((pred == labels.cpu()).double().mean()) if len(labels) else float("nan")


def train_classifier_set(
    splits: dict, *, dataset: str, epochs: int, batch_size: int = 128, lr: float = 1e-3,
    device: torch.device | str = "cpu", seed: int = 0, max_steps: int | None = None, log=print,
    progress: ProgressFn | None = None, architectures: list[dict] | None = None,
) -> tuple[list[DigitClassifier], dict]:
    """Train one classifier per modality on `splits['train']` and score it on `splits['test']` (MultimodalSplit
    objects with labels). Returns the models and the record that goes to `classifiers.json`. `progress`:
    (steps done, steps) over all modalities."""
    train, test = splits["train"], splits["test"]
    if train.labels is None or test.labels is None:
        raise ValueError(f"{dataset}: the train and test splits need labels.npy to train digit classifiers")
    n_classes = int(max(train.labels.max(), test.labels.max())) + 1
    y_train = torch.from_numpy(np.asarray(train.labels, dtype=np.int64))
    y_test = torch.from_numpy(np.asarray(test.labels, dtype=np.int64))
    models, acc, t0 = [], [], time.perf_counter()
    per_model = epochs * batches(train.n, batch_size)
    per_model = min(per_model, max_steps) if max_steps is not None else per_model
    total = per_model * train.n_modalities
    for m in range(train.n_modalities):
        model = train_classifier(torch.from_numpy(np.asarray(train.modalities[m])), y_train, n_classes=n_classes,
                                 epochs=epochs, batch_size=batch_size, lr=lr, device=device, seed=seed + m,
                                 max_steps=max_steps, progress=shifted(progress, m * per_model, total),
                                 architecture=None if architectures is None else architectures[m])
        acc.append(accuracy(model, torch.from_numpy(np.asarray(test.modalities[m])), y_test))
        models.append(model)
        log(f"m{m}: test accuracy {acc[-1]:.4f}")
    record = {
        "dataset": dataset, "n_classes": n_classes, "n_modalities": train.n_modalities, "epochs": epochs,
        "max_steps": max_steps, "batch_size": batch_size, "lr": lr, "seed": seed, "n_train": train.n,
        "n_test": test.n, "test_accuracy": acc, "train_seconds": time.perf_counter() - t0,
        "architecture": "DigitClassifier (DESIGN section 4)",
    }
    if architectures is not None:
        record["architecture"] = "per modality (cmvae/evaluation/modality_classifiers.py)"
        record["architectures"] = architectures
    return models, record
