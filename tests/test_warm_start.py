"""The `contrast` element of the `fast` recipe: the cross-modal InfoNCE, the z-tower warm start, its rescale of
the posterior means, its fading weight, its resumability, and its place in the training loop."""

import json
import math
import os
import signal

import pytest
import torch
import torch.nn.functional as F
from rich.console import Console

from cmvae_engine.cmvae.alignment import cross_modal_infonce
from cmvae_engine.cmvae.config import ModelConfig
from cmvae_engine.cmvae.data import synth_polydigits
from cmvae_engine.cmvae.model import CMVAE
from cmvae_engine.engine.config import FastRecipeConfig, TrainConfig
from cmvae_engine.engine.fast_recipe import FastRecipe, probe_means
from cmvae_engine.engine.recipes import build_recipe
from cmvae_engine.engine.signals import Stopped
from cmvae_engine.engine.trainer import train
from cmvae_engine.engine.warm_start import ContrastWarmStart, WarmStartContext, z_tower_parameters

QUIET = Console(quiet=True)


def naive_infonce(z_loc: torch.Tensor, tau: float) -> torch.Tensor:
    """The definition, one ordered pair and one row at a time."""
    m, b, _ = z_loc.shape
    z = [F.normalize(z_loc[i] - z_loc[i].mean(0), dim=-1) for i in range(m)]
    terms = []
    for i in range(m):
        for j in range(m):
            if i == j:
                continue
            for r in range(b):
                logits = torch.stack([z[i][r] @ z[j][c] for c in range(b)]) / tau
                terms.append(torch.logsumexp(logits, 0) - logits[r])
    return torch.stack(terms).mean()


@pytest.mark.parametrize("shape", [(2, 2, 1), (3, 5, 4), (4, 7, 3)])
def test_infonce_matches_its_definition_in_value_and_gradient(shape):
    g = torch.Generator().manual_seed(sum(shape))
    z = torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)
    got = cross_modal_infonce(z, 0.3)
    want = naive_infonce(z, 0.3)
    torch.testing.assert_close(got, want)
    (g1,) = torch.autograd.grad(got, z)
    (g2,) = torch.autograd.grad(want, z)
    torch.testing.assert_close(g1, g2)


def test_infonce_is_low_for_shared_content_and_near_log_b_otherwise():
    g = torch.Generator().manual_seed(0)
    content = torch.randn(64, 8, generator=g)
    aligned = torch.stack([content + 0.05 * torch.randn(64, 8, generator=g) for _ in range(3)])
    unrelated = torch.randn(3, 64, 8, generator=g)
    assert float(cross_modal_infonce(aligned, 0.1)) < 0.5  # chance: log 64 = 4.16
    assert abs(float(cross_modal_infonce(unrelated, 1.0)) - math.log(64)) < 0.2
    # an offset or a scale per modality changes nothing (centred cosines)
    shifted = aligned * torch.tensor([1.0, 3.0, 0.5])[:, None, None] + torch.tensor([0.0, 5.0, -2.0])[:, None, None]
    torch.testing.assert_close(cross_modal_infonce(shifted, 0.1), cross_modal_infonce(aligned, 0.1))
    with pytest.raises(ValueError, match="2 modalities"):
        cross_modal_infonce(torch.zeros(1, 4, 2))


@pytest.fixture(scope="module")
def shared_content_images():
    """Three 'modalities' showing the same random blob pattern per tuple in different colours and noise."""
    g = torch.Generator().manual_seed(5)
    n = 48
    pattern = (torch.rand(n, 1, 7, 7, generator=g) > 0.5).float()
    pattern = F.interpolate(pattern, size=28, mode="nearest")
    out = []
    for m, colour in enumerate(((1.0, 0.2, 0.2), (0.2, 1.0, 0.2), (0.2, 0.2, 1.0))):
        noise = 0.2 * torch.rand(n, 3, 28, 28, generator=g)
        img = pattern * torch.tensor(colour)[:, None, None] + noise + 0.1 * m
        out.append((img.clamp(0, 1) * 255).to(torch.uint8))
    return torch.stack(out)


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return CMVAE(ModelConfig(n_modalities=3, n_clusters=4, z_dim=6, w_dim=2, width=0.0625))


def ctx(model, images, stop=lambda: False, seed=0):
    return WarmStartContext(model, images, torch.device("cpu"), 16, seed, QUIET, should_stop=stop)


def test_warm_start_trains_only_the_z_towers_and_rescales_their_means(shared_content_images):
    images = shared_content_images
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = FastRecipeConfig(contrast_steps=60, contrast_lr=3e-3, contrast_tau=0.2, contrast_spread=3.0)
    warm = ContrastWarmStart(cfg)
    warm.run(ctx(model, images))
    assert warm.done and warm.step == 60 and len(warm.losses) == 2  # at 50 and at the end
    # the z towers' bodies and loc heads learn (the scale head is not in the loss); the w towers, decoders and
    # priors are untouched
    z_names = {n for n, _ in model.named_parameters() if ".tower_z." in n and ".raw_scale." not in n}
    for name, value in model.state_dict().items():
        changed = not torch.equal(value, before[name])
        assert changed == (name in z_names), name
    # the loss fell from chance (log 16) and the means are centred with the requested spread, per modality
    assert warm.losses[-1][1] < math.log(16) - 0.5
    with torch.no_grad():
        mu = probe_means(model, images)
    torch.testing.assert_close(mu.mean(1), torch.zeros(3, 6), atol=1e-4, rtol=0)
    torch.testing.assert_close(mu.var(1).mean(-1).sqrt(), torch.full((3,), 3.0), atol=1e-4, rtol=0)
    # InfoNCE is scale- and offset-free: the rescale kept what it learnt
    x = images.float() / 255
    z = torch.stack([enc.tower_z(x[m])[0] for m, enc in enumerate(model.encoders)])
    assert float(cross_modal_infonce(z.detach(), 0.2)) < math.log(48) - 0.5


def test_a_stopped_warm_start_resumes_to_the_same_towers(shared_content_images):
    images = shared_content_images
    cfg = FastRecipeConfig(contrast_steps=12, contrast_tau=0.2)
    full = tiny_model()
    ContrastWarmStart(cfg).run(ctx(full, images))

    part = tiny_model()
    first = ContrastWarmStart(cfg)
    calls = iter(range(100))
    first.run(ctx(part, images, stop=lambda: next(calls) >= 5))
    assert not first.done and first.step == 5
    state = first.state_dict()
    again = ContrastWarmStart(cfg)
    again.load_state_dict(state)
    again.run(ctx(part, images))
    assert again.done and again.step == 12
    for a, b in zip(z_tower_parameters(full), z_tower_parameters(part), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_aux_weight_fades_to_zero_and_is_off_without_the_element():
    cfg = FastRecipeConfig(contrast_weight=100.0, contrast_anneal_steps=10)
    r = FastRecipe(cfg)
    assert r.aux_loss() is not None and r.active_elements()[0] == "contrast"
    assert r.aux_weight(0) == 0.0  # nothing before the warm start has run
    r.warm.done = True
    assert [r.aux_weight(s) for s in (0, 5, 10, 50)] == [100.0, 50.0, 0.0, 0.0]
    off = FastRecipe(FastRecipeConfig(contrast=False))
    assert off.aux_loss() is None and off.aux_weight(0) == 0.0 and "contrast" not in off.active_elements()
    paper = build_recipe("paper", cfg)
    assert paper.aux_loss() is None and paper.aux_weight(0) == 0.0
    assert paper.warm_start(ctx(tiny_model(), torch.zeros(3, 4, 3, 28, 28, dtype=torch.uint8))) is False


def test_aux_loss_is_the_per_tuple_infonce_of_the_batch_posterior():
    r = FastRecipe(FastRecipeConfig(contrast_tau=0.5))
    z = torch.randn(3, 10, 4, generator=torch.Generator().manual_seed(2))

    class Post:
        z_loc = z

    torch.testing.assert_close(r.aux_loss()(Post), 10 * cross_modal_infonce(z, 0.5))


def test_streaming_loaders_skip_the_warm_start(shared_content_images):
    r = FastRecipe(FastRecipeConfig())
    model = tiny_model()
    before = [p.clone() for p in z_tower_parameters(model)]
    assert r.warm_start(ctx(model, None)) is False
    assert all(torch.equal(a, b) for a, b in zip(before, z_tower_parameters(model), strict=True))
    r.warm.done = True
    assert r.aux_weight(0) == 0.0


@pytest.fixture(scope="module")
def pd3(tmp_path_factory):
    root = tmp_path_factory.mktemp("warm") / "pd3"
    return synth_polydigits(root, n_modalities=3, n_train=64, n_valid=16, n_test=32, seed=1)


def fast_cfg(data, out, **fast):
    cfg = TrainConfig(recipe="fast", out=str(out), threads=1, log_every=2, eval_every=0, kernels="torch")
    cfg.data.dataset = str(data)
    cfg.model.width, cfg.model.n_clusters, cfg.model.z_dim, cfg.model.w_dim = 0.0625, 4, 6, 4
    cfg.optim.batch_size, cfg.optim.epochs = 16, 2
    cfg.fast = FastRecipeConfig(contrast_steps=8, contrast_anneal_steps=4, min_steps=100, **fast)
    return cfg


def test_training_with_the_warm_start_checkpoints_it_and_resumes_after_it(pd3, tmp_path):
    out = tmp_path / "run"
    train(fast_cfg(pd3, out), QUIET)
    payload = torch.load(out / "checkpoint.pt", weights_only=True)
    warm = payload["recipe"]["warm_start"]
    assert warm["done"] and warm["step"] == 8 and warm["optimizer"] is None
    assert json.loads((out / "config.json").read_text())["config"]["fast"]["contrast"] is True
    # the same run without the element trains other towers: the warm start took part
    plain = tmp_path / "plain"
    train(fast_cfg(pd3, plain, contrast=False), QUIET)
    a = torch.load(out / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(plain / "checkpoint.pt", weights_only=True)["model"]
    assert not torch.equal(a["encoders.0.tower_z.loc.weight"], b["encoders.0.tower_z.loc.weight"])


def test_a_run_stopped_in_the_warm_start_resumes_it_and_matches(pd3, tmp_path, monkeypatch):
    import cmvae_engine.engine.warm_start as ws

    whole = tmp_path / "whole"
    train(fast_cfg(pd3, whole), QUIET)

    # SIGTERM during the third warm-start step: the loop checkpoints at step 0 and says how to continue
    stopped = tmp_path / "stopped"
    calls = {"n": 0}

    def infonce_then_signal(z, tau):
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return cross_modal_infonce(z, tau)

    monkeypatch.setattr(ws, "cross_modal_infonce", infonce_then_signal)
    with pytest.raises(Stopped, match="before step 1"):
        train(fast_cfg(pd3, stopped), QUIET)
    monkeypatch.undo()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    payload = torch.load(stopped / "checkpoint.pt", weights_only=True)
    assert json.loads(payload["state"])["step"] == 0
    warm = payload["recipe"]["warm_start"]
    assert warm["step"] == 3 and not warm["done"] and warm["optimizer"] is not None

    cfg = fast_cfg(pd3, stopped)
    cfg.resume = True
    train(cfg, QUIET)
    a = torch.load(whole / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(stopped / "checkpoint.pt", weights_only=True)["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def test_convergence_benchmark_counts_the_warm_start_and_scores_its_model(pd3, tmp_path):
    from cmvae_engine.bench.convergence import ConvergenceSettings, run_convergence

    fast = FastRecipeConfig(contrast_steps=6, contrast_anneal_steps=2, min_steps=100)
    s = ConvergenceSettings(dataset=str(pd3), recipes=["fast"], seeds=[0], budget_minutes=5, max_steps=4,
                            eval_every_steps=2, prune_every=0, width=0.0625, clusters=4, batch_size=16, fast=fast,
                            threads=1, out_dir=str(tmp_path))
    run = json.loads(run_convergence(s, QUIET).read_text())["runs"][0]
    assert run["active_elements"][0] == "contrast"
    steps = [row["step"] for row in run["curve"]]
    assert steps == [0, 0, 2, 4]  # before and after the warm start, then the CMVAE steps
    assert 0 < run["curve"][1]["train_s"] <= run["curve"][2]["train_s"]
    assert run["recipe_log"]["warm_start"]["done"] and run["recipe_log"]["warm_start"]["step"] == 6
