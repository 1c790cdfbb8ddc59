"""The Python API (engine/api.py) on a tiny trained run, and every Python block of the README run as written."""

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from cmvae_engine.cmvae.clustering import majority_vote
from cmvae_engine.cmvae.config import ModelConfig
from cmvae_engine.cmvae.data import synth_polydigits
from cmvae_engine.engine import api
from cmvae_engine.engine.config import DataConfig, OptimConfig, TrainConfig
from cmvae_engine.engine.run import load_run as load_checkpoint
from cmvae_engine.engine.trainer import train

README = Path(__file__).resolve().parent.parent / "README.md"
K = 5


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    data = synth_polydigits(tmp_path_factory.mktemp("data") / "pd3", n_modalities=3, n_train=96, n_valid=32,
                            n_test=40, seed=0)
    out = tmp_path_factory.mktemp("runs") / "tiny"
    train(TrainConfig(model=ModelConfig(n_clusters=K, z_dim=8, w_dim=4, width=0.0625),
                      data=DataConfig(dataset=str(data)), optim=OptimConfig(epochs=1, batch_size=48),
                      out=str(out), log_every=1, device="cpu", eval_every=0))
    return out


def test_load_read_encode_assign(run_dir):
    run = api.load_run(run_dir)
    assert run.checkpoint == "checkpoint.pt" and "M=3 K=5" in repr(run)
    images, labels = api.read_split(run, "test")
    assert images.dtype == np.uint8 and images.shape == (3, 40, 3, 28, 28) and labels.shape == (40,)
    model = load_checkpoint(run_dir).model

    codes = run.encode(images)
    with torch.no_grad():
        post = model.encode(torch.from_numpy(images).float() / 255)
    np.testing.assert_allclose(codes.z, post.z_loc.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(codes.w_scale, post.w_scale.numpy(), rtol=1e-5, atol=1e-6)
    # float input in [0, 1] and a list of per-modality arrays are the same images
    np.testing.assert_allclose(api.encode(run, list(images.astype(np.float32) / 255)).z, codes.z, atol=1e-5)
    drawn = run.encode(images, sample=True, seed=3)
    assert not np.allclose(drawn.z, codes.z) and np.array_equal(drawn.z, run.encode(images, sample=True, seed=3).z)

    found = api.assign(run, images)
    # independent of the API: p(c | z) by Bayes' rule on the prior, from the means
    log_pi, loc, scale = (t.detach() for t in model.prior_params())
    comp = torch.distributions.Laplace(loc, scale).log_prob(post.z_loc[:, :, None, :]).sum(-1) + log_pi
    resp = torch.softmax(comp, dim=-1)
    np.testing.assert_allclose(found.responsibilities, resp.numpy(), atol=1e-4)
    assert np.array_equal(found.per_modality, resp.argmax(-1).numpy())
    assert np.array_equal(found.clusters, majority_vote(resp.argmax(-1), K).numpy())
    conf = run.assign(images, rule="confidence")
    assert np.array_equal(conf.clusters, resp.mean(0).argmax(-1).numpy())
    np.testing.assert_allclose(conf.confidence, resp.mean(0).max(-1).values.numpy(), atol=1e-5)
    with pytest.raises(ValueError, match="rule"):
        run.assign(images, rule="majority")
    with pytest.raises(ValueError, match="modalities"):
        run.encode(images[:2])
    with pytest.raises(ValueError, match=r"\[M, N, C, H, W\]"):
        run.encode(images[0])


def test_generate_reconstruct_and_pruned_default(run_dir, tmp_path):
    run = api.load_run(run_dir)
    assert sorted(run.clusters) == list(range(K))
    masses = run.prior_mass
    assert masses.shape == (K,) and abs(masses.sum() - 1) < 1e-5
    assert all(masses[a] >= masses[b] for a, b in zip(run.clusters, run.clusters[1:], strict=False))
    out = api.generate(run, 4, cluster=run.clusters[0], seed=1)
    assert out.dtype == np.uint8 and out.shape == (3, 4, 3, 28, 28)
    assert np.array_equal(out, run.generate(4, cluster=run.clusters[0], seed=1))
    images, _ = run.read_split("test")
    rec = api.reconstruct(run, images[:, :4])
    with torch.no_grad():
        want = load_checkpoint(run_dir).model.reconstruct(torch.from_numpy(images[:, :4]).float() / 255)
    assert rec.dtype == np.uint8 and np.abs(rec.astype(int) - (want * 255).round().numpy()).max() <= 1
    assert run.generate_from(images[:, :4], source=1).shape == (3, 4, 3, 28, 28)

    # a pruned.pt is what load_run takes by default; a pruned cluster cannot be drawn from
    model = load_checkpoint(run_dir).model
    model.cluster_active[run.clusters[-1]] = False
    from cmvae_engine.engine.checkpoint import save_checkpoint

    save_checkpoint(tmp_path / "pruned.pt", model=model, optimizer=None, config=run.config.to_dict(), state={})
    (tmp_path / "checkpoint.pt").symlink_to(run_dir / "checkpoint.pt")
    pruned = api.load_run(tmp_path)
    assert pruned.checkpoint == "pruned.pt" and len(pruned.clusters) == K - 1
    assert pruned.prior_mass[run.clusters[-1]] == 0
    with pytest.raises(ValueError, match="not active"):
        pruned.generate(2, cluster=run.clusters[-1])


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def test_every_readme_python_block_runs(run_dir, tmp_path, monkeypatch, capsys):
    """Each block in its own namespace, from a folder where runs/demo is the tiny run: a block that uses a name it
    never defines fails here."""
    blocks = python_blocks(README.read_text())
    assert len(blocks) >= 2 and any("engine.api" in b for b in blocks) and any("prune_model" in b for b in blocks)
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "demo").symlink_to(run_dir)
    monkeypatch.chdir(tmp_path)
    for i, block in enumerate(blocks):
        exec(compile(block, f"README.md python block {i + 1}", "exec"), {"__name__": "__readme__"})
    printed = capsys.readouterr().out
    assert "nmi" in printed and "kept" in printed
