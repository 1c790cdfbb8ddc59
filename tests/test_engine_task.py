"""The seam between the loop and a model family: a family the engine has never heard of (a tiny denoising
autoencoder defined here) trains through the same `train()` as CMVAE, with its own step scalars, evaluation
columns and outputs, checkpoints and an exact resume; and the step's generic parts (vector scalars, gradient
clipping) do what they say."""

from __future__ import annotations

import json
import os
import signal
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from rich.console import Console
from torch import nn

from cmvae_engine.cmvae import config as model_configs
from cmvae_engine.cmvae.data import synth_polydigits
from cmvae_engine.engine import tasks, trainer
from cmvae_engine.engine.checkpoint import load_checkpoint
from cmvae_engine.engine.config import CheckpointConfig, DataConfig, OptimConfig, StepConfig, TrainConfig
from cmvae_engine.engine.recipes import Recipe
from cmvae_engine.engine.run import load_run
from cmvae_engine.engine.signals import Stopped
from cmvae_engine.engine.step import TrainStep, resolve_options
from cmvae_engine.engine.tasks import Task

QUIET = Console(quiet=True)
CPU = torch.device("cpu")


@dataclass
class ToyConfig:
    kind: str = "toy"
    hidden: int = 8
    n_modalities: int = 0


class ToyModel(nn.Module):
    def __init__(self, cfg: ToyConfig):
        super().__init__()
        self.enc = nn.Linear(28 * 28, cfg.hidden)
        self.dec = nn.Linear(cfg.hidden, 28 * 28)


class ToyObjective(nn.Module):
    """Denoising: noise of std `noise` on the grey image of modality 0, MSE of the reconstruction; the loss is the
    batch sum times scalars["weight"][0] (the reported sum ignores the weight)."""

    def __init__(self, model: ToyModel):
        super().__init__()
        self.model = model

    def forward(self, xb, scalars):
        x = xb[0].float().mean(1).flatten(1) / 255.0
        noisy = x + scalars["noise"] * torch.randn_like(x)
        err = ((self.model.dec(torch.relu(self.model.enc(noisy))) - x) ** 2).sum(1)
        return scalars["weight"][0] * err.sum(), err.sum().detach()


class ToyRecipe(Recipe):
    name = "toy"
    signal_at: int | None = None

    def scalars(self, step):
        return {"noise": 0.1 + 0.01 * step, "weight": (1.0, 0.0)}

    def after_step(self, ctx):
        if ctx.step == self.signal_at:
            os.kill(os.getpid(), signal.SIGTERM)


class ToyTask(Task):
    kind = "toy"

    def adapt_config(self, cfg, data_info):
        cfg.model.n_modalities = len(data_info["modalities"])

    def build_model(self, cfg):
        return ToyModel(cfg.model)

    def build_recipe(self, cfg):
        return ToyRecipe()

    def build_objective(self, model, cfg, recipe, loss_scale):
        return ToyObjective(model)

    def networks(self, model):
        return [("enc", model.enc), ("dec", model.dec)]

    def describe(self, cfg, data_info):
        return f"toy autoencoder on {data_info['name']}"

    def metrics_fields(self, cfg):
        return {"hidden": cfg.model.hidden}

    @torch.no_grad()
    def evaluate(self, model, cfg, splits, device, progress=None):
        x = splits["test"].images[0].float().mean(1).flatten(1) / 255.0
        return {"test_mse": float(((model.dec(torch.relu(model.enc(x))) - x) ** 2).sum(1).mean())}

    def save_outputs(self, model, cfg, splits, out, device):
        (Path(out) / "toy.txt").write_text("done\n")
        return ["toy.txt"]


@pytest.fixture
def toy_registered(monkeypatch):
    monkeypatch.setitem(model_configs.MODEL_CONFIGS, "toy", ToyConfig)
    monkeypatch.setitem(tasks.TASKS, "toy", f"{__name__}:ToyTask")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return synth_polydigits(tmp_path_factory.mktemp("data") / "pd2", n_modalities=2, n_train=64, n_valid=16,
                            n_test=16, seed=0)


def toy_config(data, out, **kw) -> TrainConfig:
    return TrainConfig(model=ToyConfig(), data=DataConfig(dataset=str(data)),
                       optim=OptimConfig(epochs=3, batch_size=16, lr=1e-2), ckpt=CheckpointConfig(every=1),
                       out=str(out), log_every=1, seed=3, **kw)


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_a_new_family_trains_through_the_one_loop(toy_registered, data, tmp_path):
    out = tmp_path / "toy"
    last = trainer.train(toy_config(data, out), QUIET)
    rows = _rows(out)
    assert [r["epoch"] for r in rows] == [1, 2, 3] and last["step"] == 12
    assert all(r["hidden"] == 8 and "test_mse" in r for r in rows)
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]  # it trained
    assert (out / "toy.txt").read_text() == "done\n"
    saved = json.loads((out / "config.json").read_text())["config"]
    assert saved["model"] == {"kind": "toy", "hidden": 8, "n_modalities": 2}  # the data decided M
    run = load_run(out)
    assert isinstance(run.model, ToyModel) and isinstance(run.config.model, ToyConfig)


def test_a_new_family_resumes_exactly(toy_registered, data, tmp_path, monkeypatch):
    full, cut = tmp_path / "full", tmp_path / "cut"
    trainer.train(toy_config(data, full), QUIET)
    monkeypatch.setattr(ToyRecipe, "signal_at", 6)
    with pytest.raises(Stopped):
        trainer.train(toy_config(data, cut), QUIET)
    assert load_checkpoint(cut / "checkpoint.pt")["state"]["step"] == 6
    monkeypatch.setattr(ToyRecipe, "signal_at", None)
    trainer.train(toy_config(data, cut, resume=True), QUIET)
    a, b = load_checkpoint(full / "checkpoint.pt"), load_checkpoint(cut / "checkpoint.pt")
    assert all(torch.equal(v, b["model"][k]) for k, v in a["model"].items())  # bit for bit
    assert [r["train_loss"] for r in _rows(full)] == pytest.approx([r["train_loss"] for r in _rows(cut)],
                                                                   rel=1e-12)


def test_unknown_kinds_are_refused_by_name():
    with pytest.raises(ValueError, match="no training task for model kind 'nope'"):
        tasks.task_for("nope")
    with pytest.raises(ValueError, match="unknown model kind 'nope'"):
        model_configs.model_config_from_dict({"kind": "nope"})


def _toy_step(grad_clip=None):
    torch.manual_seed(0)
    model = ToyModel(ToyConfig())
    opts = resolve_options(StepConfig(amp=False), CPU)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)  # the update is minus the gradient
    return model, TrainStep(ToyObjective(model), opt, opts, CPU, grad_clip=grad_clip)


def test_step_scalars_are_filled_in_place_and_vectors_work():
    _, step = _toy_step()
    xb = torch.randint(0, 256, (2, 4, 3, 28, 28), dtype=torch.uint8)
    step(xb, 1, {"noise": 0.0, "weight": (2.0, 5.0)})
    held = step.scalars["weight"]
    step(xb, 2, {"noise": 0.5, "weight": (3.0, 4.0)})
    assert step.scalars["weight"] is held and held.tolist() == [3.0, 4.0] and float(step.scalars["noise"]) == 0.5
    with pytest.raises(ValueError, match="step scalars changed"):
        step(xb, 3, {"noise": 0.5})


def test_gradient_clipping_bounds_the_update():
    xb = torch.randint(0, 256, (2, 4, 3, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    scalars = {"noise": 0.0, "weight": (1.0, 0.0)}
    free_model, free = _toy_step()
    before = [p.detach().clone() for p in free_model.parameters()]
    free(xb, 1, scalars)
    moved = torch.cat([(p.detach() - b).flatten() for p, b in zip(free_model.parameters(), before, strict=True)])
    clip_model, clipped = _toy_step(grad_clip=0.5)
    clipped(xb, 1, scalars)
    moved_clipped = torch.cat([(p.detach() - b).flatten()
                               for p, b in zip(clip_model.parameters(), before, strict=True)])
    # SGD at lr 1: the update is minus the gradient, so its norm is the (clipped) gradient norm.
    assert moved.norm() > 1.0
    torch.testing.assert_close(moved_clipped.norm(), torch.tensor(0.5), rtol=1e-4, atol=0)
    torch.testing.assert_close(moved_clipped, moved * (0.5 / moved.norm()), rtol=1e-4, atol=1e-7)
