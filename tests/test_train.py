"""End-to-end training on CPU: short runs on a small synthesised data set."""

import json

import pytest
import torch

from cmvae_engine.cmvae.config import ModelConfig
from cmvae_engine.cmvae.data import synth_polydigits
from cmvae_engine.engine.checkpoint import load_checkpoint
from cmvae_engine.engine.config import DataConfig, OptimConfig, TrainConfig
from cmvae_engine.engine.run import load_run
from cmvae_engine.engine.trainer import train


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data") / "pd3"
    return synth_polydigits(root, n_modalities=3, n_train=256, n_valid=32, n_test=64, seed=0)


def tiny_config(data, out, **kw):
    opts = {"epochs": 3, "batch_size": 32}
    opts.update(kw.pop("optim", {}))
    return TrainConfig(
        model=ModelConfig(n_clusters=4, z_dim=8, w_dim=4, width=0.0625),
        data=DataConfig(dataset=str(data)), optim=OptimConfig(**opts), out=str(out), log_every=4, **kw,
    )


def test_training_loss_falls_and_outputs_exist(tiny_data, tmp_path):
    out = tmp_path / "run"
    train(tiny_config(tiny_data, out, optim={"lr": 3e-3}))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert all(r["reduced"] for r in rows)
    for key in ("test_bound", "test_nmi", "test_ari", "test_acc"):
        assert key in rows[-1]
    for name in ("recon.png", "samples.png", "config.json", "checkpoint.pt"):
        assert (out / name).stat().st_size > 0
    ckpt = load_checkpoint(out / "checkpoint.pt")
    assert ckpt["state"]["epoch"] == 3 and ckpt["config"]["model"]["width"] == 0.0625
    run = load_run(out)
    assert run.model.config.n_modalities == 3
    x = torch.rand(3, 2, 3, 28, 28)
    assert run.model.reconstruct(x).shape == x.shape


def test_max_steps_and_mmvaeplus(tiny_data, tmp_path):
    cfg = tiny_config(tiny_data, tmp_path / "mm", optim={"max_steps": 3})
    cfg.model = ModelConfig(kind="mmvaeplus", z_dim=8, w_dim=4, width=0.0625)
    last = train(cfg)
    assert last["step"] == 3
    assert "test_nmi" not in last  # one cluster: nothing to score


def test_same_seed_same_losses(tiny_data, tmp_path):
    a = train(tiny_config(tiny_data, tmp_path / "a", optim={"max_steps": 4}, eval_every=0))
    b = train(tiny_config(tiny_data, tmp_path / "b", optim={"max_steps": 4}, eval_every=0))
    assert a["train_loss"] == b["train_loss"]


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="objective"):
        TrainConfig(objective="elbo")
    with pytest.raises(ValueError, match="n_samples"):
        TrainConfig(n_samples=0)
