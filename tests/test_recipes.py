"""Training recipes: `paper` changes nothing; the `fast` recipe's k-means, agreement scores, trigger, prior fit,
collapse refit, learning rates, beta warm-up, switches and state."""

import pytest
import torch
from rich.console import Console
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

import cmvae_engine.engine.fast_recipe as fr
from cmvae_engine.cmvae.clustering import to_float
from cmvae_engine.cmvae.config import ModelConfig
from cmvae_engine.cmvae.model import CMVAE
from cmvae_engine.cmvae.objectives import loss_fn
from cmvae_engine.engine.config import FAST_ELEMENTS, FastRecipeConfig, TrainConfig
from cmvae_engine.engine.fast_recipe import FastRecipe, ari, cross_modal_agreement, nmi
from cmvae_engine.engine.kmeans import kmeans
from cmvae_engine.engine.recipes import PaperRecipe, StepContext, build_recipe

QUIET = Console(quiet=True)


def tiny_model(k=4, z_dim=3, m=2, seed=0, learn_scales=False):
    torch.manual_seed(seed)
    return CMVAE(ModelConfig(n_modalities=m, n_clusters=k, z_dim=z_dim, w_dim=2, width=0.0625,
                             learn_scales=learn_scales))


def blobs(centres, n_per, spread, g):
    """Points around each centre [C, D] -> (x [C * n_per, D], labels)."""
    labels = torch.arange(len(centres)).repeat_interleave(n_per)
    return centres[labels] + spread * torch.randn(len(labels), centres.shape[1], generator=g), labels


# ----- paper ---------------------------------------------------------------------------------------------
def test_paper_is_the_plain_reference_procedure():
    r = build_recipe("paper", beta=2.5)
    assert type(r) is PaperRecipe and r.name == "paper" and r.active_elements() == []
    model = tiny_model()
    groups = r.param_groups(model, 1e-3)
    assert len(groups) == 1 and groups[0]["lr"] == 1e-3
    assert [id(p) for p in groups[0]["params"]] == [id(p) for p in model.parameters() if p.requires_grad]
    assert [r.beta(s, 2.5) for s in (0, 1, 10_000)] == [2.5, 2.5, 2.5]
    assert [r.scalars(s) for s in (0, 10_000)] == [{"beta": 2.5, "aux_weight": 0.0}] * 2
    assert build_recipe("paper", beta=1.5).scalars(7) == {"beta": 1.5, "aux_weight": 0.0}
    assert r.state_dict() == {}
    with pytest.raises(ValueError, match="--recipe"):
        build_recipe("quick")


def _train_steps(recipe: PaperRecipe | None, n_steps: int, images: torch.Tensor) -> CMVAE:
    """n_steps of the reference step; recipe=None bypasses every hook."""
    model = tiny_model(k=3, m=2, seed=3)
    lr, base_beta = 2e-3, 2.5
    groups = recipe.param_groups(model, lr) if recipe else [{"params": list(model.parameters()), "lr": lr}]
    opt = torch.optim.Adam(groups, lr=lr, amsgrad=True)
    for step in range(n_steps):
        x = to_float(images[:, (step * 4) % 12:(step * 4) % 12 + 4])
        beta = recipe.beta(step, base_beta) if recipe else base_beta
        torch.manual_seed(100 + step)  # the posterior samples
        out = loss_fn(model, x, beta=beta, generator=None)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        if recipe:
            recipe.after_step(StepContext(step + 1, 0, model, opt, images, torch.device("cpu"), QUIET))
    return model


def test_paper_ignores_every_fast_setting():
    # The `fast` settings travel in every TrainConfig; under `paper` none of them may take effect.
    everything = FastRecipeConfig.from_flags(enable=",".join(FAST_ELEMENTS), settings="min_steps=0,check_every=1")
    r = build_recipe("paper", everything)
    assert type(r) is PaperRecipe and r.active_elements() == []
    assert [r.beta(s, 2.5) for s in (0, 1, 50)] == [2.5, 2.5, 2.5]
    model = tiny_model()
    assert len(r.param_groups(model, 1e-3)) == 1


def test_paper_hooks_leave_every_parameter_bit_identical():
    images = torch.randint(0, 256, (2, 12, 3, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    bypassed = _train_steps(None, 5, images)
    paper = _train_steps(build_recipe("paper"), 5, images)
    for (name, a), (_, b) in zip(bypassed.state_dict().items(), paper.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    # The hooks do act when a recipe changes something: the fast prior lr alone makes a difference.
    fast = FastRecipe(FastRecipeConfig(min_steps=0, check_every=1, probe_size=8, agree_min=0.0, agree_plateau=1.0,
                                       refit=False))
    fitted = _train_steps(fast, 5, images)
    assert fast.fitted_at is not None
    assert not torch.equal(fitted.prior_loc, paper.prior_loc)


def test_train_config_defaults_to_paper_and_fast_settings_round_trip():
    cfg = TrainConfig()
    assert cfg.recipe == "paper"
    cfg.fast = FastRecipeConfig.from_flags("refit", "beta-warmup", "check_every=7,prior_lr_mult=3")
    back = TrainConfig.from_dict(cfg.to_dict())
    assert back.fast == cfg.fast and back.fast.check_every == 7 and back.fast.prior_lr_mult == 3.0


# ----- k-means and the agreement scores -----------------------------------------------------------------
def test_kmeans_recovers_separated_blobs_and_beats_a_single_restart():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(6, 5, generator=g) * 10
    x, labels = blobs(centres, 50, 0.5, g)
    res = kmeans(x, 6, restarts=4, generator=torch.Generator().manual_seed(1))
    assert adjusted_rand_score(labels.numpy(), res.labels.numpy()) == pytest.approx(1.0)
    assert int(res.counts.sum()) == 300 and sorted(res.counts.tolist()) == [50] * 6
    expected = sum(((x[res.labels == c] - x[res.labels == c].mean(0)) ** 2).sum() for c in range(6))
    assert float(res.inertia) == pytest.approx(float(expected), rel=1e-4)
    one = kmeans(x, 6, restarts=1, iters=0, generator=torch.Generator().manual_seed(1))
    assert float(res.inertia) <= float(one.inertia) + 1e-3


def test_kmeans_refuses_bad_input():
    with pytest.raises(ValueError, match="k="):
        kmeans(torch.zeros(3, 2), 4)
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        kmeans(torch.zeros(3), 1)
    same = kmeans(torch.ones(5, 2), 2, generator=torch.Generator().manual_seed(0))  # all points identical
    assert torch.allclose(same.centroids, torch.ones(2, 2)) and float(same.inertia) == 0.0


@pytest.mark.parametrize("k", [2, 5, 11])
def test_nmi_and_ari_match_sklearn(k):
    g = torch.Generator().manual_seed(k)
    a = torch.randint(k, (301,), generator=g)
    b = torch.where(torch.rand(301, generator=g) < 0.5, a, torch.randint(k, (301,), generator=g))
    assert float(nmi(a, b, k)) == pytest.approx(normalized_mutual_info_score(a, b), abs=1e-9)
    assert float(ari(a, b, k)) == pytest.approx(adjusted_rand_score(a, b), abs=1e-9)
    assert float(ari(a, a, k)) == pytest.approx(1.0)


def test_cross_modal_agreement_is_high_for_shared_content_and_near_zero_otherwise():
    g = torch.Generator().manual_seed(0)
    content = torch.randint(8, (400,), generator=g)
    shared = content.expand(3, -1)
    independent = torch.randint(8, (3, 400), generator=g)
    assert float(cross_modal_agreement(shared, 8)[0]) == pytest.approx(1.0)
    a_ind, n_ind = cross_modal_agreement(independent, 8)
    assert abs(float(a_ind)) < 0.02 and 0 < float(n_ind) < 0.05  # NMI's chance bias is positive


# ----- the fast recipe -------------------------------------------------------------------------------------
def test_fast_config_switches_and_errors():
    assert FastRecipeConfig().active() == ["contrast", "init", "refit", "prior-lr"]
    assert FastRecipeConfig.from_flags("init,contrast").active() == []  # refit and prior-lr follow the fit
    everything = FastRecipeConfig.from_flags(enable=",".join(FAST_ELEMENTS))
    assert everything.active() == list(FAST_ELEMENTS)
    with pytest.raises(ValueError, match="--fast-disable.*'warmup'"):
        FastRecipeConfig.from_flags("warmup")
    with pytest.raises(ValueError, match="--fast-set: expected key=value"):
        FastRecipeConfig.from_flags(settings="check_every")
    with pytest.raises(ValueError, match="--fast-set: check_every needs a int"):
        FastRecipeConfig.from_flags(settings="check_every=soon")
    with pytest.raises(ValueError, match="collapse_frac"):
        FastRecipeConfig(collapse_frac=2.0)
    with pytest.raises(ValueError, match="check_every"):
        FastRecipeConfig(check_every=0)


def test_beta_warmup_ramps_to_the_configured_beta():
    r = FastRecipe(FastRecipeConfig(beta_warmup=True, beta_start=0.2, warmup_steps=10))
    assert r.beta(0, 2.5) == pytest.approx(0.5)
    assert r.beta(5, 2.5) == pytest.approx(1.5)
    assert [r.beta(s, 2.5) for s in (10, 11, 10_000)] == [2.5, 2.5, 2.5]
    assert FastRecipe().beta(0, 2.5) == 2.5  # off by default


def test_param_groups_split_prior_and_networks():
    model = tiny_model(learn_scales=True)
    r = FastRecipe(FastRecipeConfig(lr_scale=True, lr_mult=3.0))
    nets, prior = r.param_groups(model, 1e-3)
    assert {id(p) for p in prior["params"]} == {id(model.prior_logits), id(model.prior_loc),
                                                 id(model.prior_raw_scale)}
    n_all = sum(1 for p in model.parameters() if p.requires_grad)
    assert len(nets["params"]) + len(prior["params"]) == n_all
    assert nets["lr"] == pytest.approx(3e-3) and prior["lr"] == pytest.approx(3e-3)


class Probe:
    """Stands in for the encoder: returns fixed posterior means [M, N, Dz] at each check."""

    def __init__(self, means):
        self.means = means

    def __call__(self, model, images, batch_size=512):
        return self.means


def _ctx(step, model, opt):
    return StepContext(step, 0, model, opt, torch.zeros(2, 64, 3, 28, 28, dtype=torch.uint8),
                       torch.device("cpu"), QUIET)


def test_trigger_waits_for_levelled_agreement_then_fits_the_prior(monkeypatch):
    g = torch.Generator().manual_seed(0)
    k, dz = 4, 3
    centres = torch.tensor([[8.0, 0, 0], [0, 8.0, 0], [0, 0, 8.0], [-8.0, -8.0, 0]])
    content = torch.arange(64) % k
    content[:32] = 0  # cluster 0 holds half the tuples: the weights must follow
    clustered = centres[content].expand(2, -1, -1) + 0.3 * torch.randn(2, 64, dz, generator=g)
    noise = torch.randn(2, 64, dz, generator=g)
    model = tiny_model(k=k, z_dim=dz)
    cfg = FastRecipeConfig(min_steps=4, check_every=2, agree_min=0.5, agree_plateau=0.05, probe_size=64)
    r = FastRecipe(cfg)
    opt = torch.optim.Adam(r.param_groups(model, 1e-3), lr=1e-3, amsgrad=True)
    loss_fn(model, torch.rand(2, 3, 3, 28, 28), beta=2.5).loss.backward()
    opt.step()  # gives the prior parameters Adam state that a fit must clear
    assert model.prior_loc in opt.state

    probe = Probe(noise)
    monkeypatch.setattr(fr, "probe_means", probe)
    for step in (1, 2, 3):  # before min_steps / off the check grid: nothing happens
        r.after_step(_ctx(step, model, opt))
    assert r.checks == []
    r.after_step(_ctx(4, model, opt))  # noise: low agreement
    probe.means = clustered
    r.after_step(_ctx(6, model, opt))  # high agreement but still rising
    assert r.fitted_at is None and [c["step"] for c in r.checks] == [4, 6]
    assert r.checks[0]["agreement"] < 0.1 < 0.9 < r.checks[1]["agreement"]
    r.after_step(_ctx(8, model, opt))  # levelled off: fit
    assert r.fitted_at == 8 and r.fits[0]["reason"] == "agreement levelled off"

    loc = model.prior_loc.detach()
    for c in centres:  # every true centre has a prior mean next to it
        assert float((loc - c).norm(dim=-1).min()) < 0.5
    pi = torch.softmax(model.prior_logits.detach(), 0)
    nearest = (loc[:, None] - centres[None]).norm(dim=-1).argmin(0)
    assert float(pi[nearest[0]]) == pytest.approx(40 / 64, abs=0.02)
    assert model.prior_loc not in opt.state and model.prior_logits not in opt.state
    assert opt.param_groups[1]["lr"] == pytest.approx(1e-3 * cfg.prior_lr_mult)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3)
    assert r.fits[0]["in_use"] == k


def test_collapse_triggers_a_refit_and_state_round_trips(monkeypatch):
    g = torch.Generator().manual_seed(1)
    k, dz = 4, 2
    centres = torch.tensor([[6.0, 0], [-6.0, 0], [0, 6.0], [0, -6.0]])
    content = torch.arange(80) % k
    clustered = centres[content].expand(2, -1, -1) + 0.2 * torch.randn(2, 80, dz, generator=g)
    model = tiny_model(k=k, z_dim=dz)
    r = FastRecipe(FastRecipeConfig(min_steps=0, check_every=1, agree_min=0.0, agree_plateau=1.0, probe_size=80,
                                    collapse_frac=0.5, max_refits=1))
    opt = torch.optim.Adam(r.param_groups(model, 1e-3), lr=1e-3)
    probe = Probe(clustered)
    monkeypatch.setattr(fr, "probe_means", probe)
    r.after_step(_ctx(1, model, opt))
    r.after_step(_ctx(2, model, opt))
    assert r.fitted_at == 2 and len(r.fits) == 1
    r.after_step(_ctx(3, model, opt))  # nothing moved: no refit
    assert len(r.fits) == 1 and r.checks[-1]["in_use"] == k
    probe.means = clustered * 0.05 + 50.0  # every point now far from all means, one cluster wins them all
    r.after_step(_ctx(4, model, opt))
    assert len(r.fits) == 2 and r.fits[1]["reason"].startswith("collapse")
    assert float((model.prior_loc.detach() - 50.0).abs().max()) < 1.0  # refitted onto the new means
    r.after_step(_ctx(5, model, opt))
    probe.means = clustered
    r.after_step(_ctx(6, model, opt))
    assert len(r.fits) == 2  # max_refits reached

    state = r.state_dict()
    again = FastRecipe(r.cfg)
    again.load_state_dict(state)
    assert again.fitted_at == 2 and again.fits == r.fits and again.checks == r.checks


def test_learned_scales_follow_the_cluster_spread(monkeypatch):
    g = torch.Generator().manual_seed(2)
    dz = 2
    centres = torch.tensor([[10.0, 0], [-10.0, 0]])
    content = torch.arange(200) % 2
    spread = torch.tensor([[2.0, 0.5], [0.5, 2.0]])  # per cluster, per dimension
    means = centres[content] + spread[content] * torch.randn(200, dz, generator=g)
    model = tiny_model(k=2, z_dim=dz, learn_scales=True)
    r = FastRecipe(FastRecipeConfig(min_steps=0, check_every=1, agree_min=0.0, agree_plateau=1.0, probe_size=200))
    opt = torch.optim.Adam(r.param_groups(model, 1e-3), lr=1e-3)
    monkeypatch.setattr(fr, "probe_means", Probe(means.expand(2, -1, -1)))
    r.after_step(_ctx(1, model, opt))
    r.after_step(_ctx(2, model, opt))
    _, loc, scale = (t.detach() for t in model.prior_params())
    first = int((loc[:, 0] > 0).nonzero()[0])  # the cluster at +10
    # Laplace scales of a block sum to D: only the shape is free; the wide dimension gets the larger scale.
    assert float(scale[first, 0]) > 1.5 * float(scale[first, 1])
    assert float(scale[1 - first, 1]) > 1.5 * float(scale[1 - first, 0])
    assert torch.allclose(scale.sum(-1), torch.full((2,), float(dz)))


def test_mmvaeplus_and_missing_images_are_left_alone(monkeypatch):
    r = FastRecipe(FastRecipeConfig(min_steps=0, check_every=1))
    model = CMVAE(ModelConfig(kind="mmvaeplus", n_modalities=2, z_dim=2, w_dim=2, width=0.0625))
    opt = torch.optim.Adam(r.param_groups(model, 1e-3), lr=1e-3)
    monkeypatch.setattr(fr, "probe_means", lambda *a, **k: pytest.fail("must not probe"))
    r.after_step(_ctx(1, model, opt))
    cm = tiny_model()
    ctx = StepContext(1, 0, cm, torch.optim.Adam(r.param_groups(cm, 1e-3)), None, torch.device("cpu"), QUIET)
    r.after_step(ctx)
    assert r.checks == [] and r.fitted_at is None


def test_probe_means_are_the_z_towers_posterior_locations():
    model = tiny_model(m=2, z_dim=3)
    images = torch.randint(0, 256, (2, 5, 3, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    means = fr.probe_means(model, images, batch_size=2)
    post = model.encode(to_float(images))
    assert means.shape == (2, 5, 3)
    assert torch.allclose(means, post.z_loc, atol=1e-6)
