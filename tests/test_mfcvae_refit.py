"""The progressive recipe's mixture refits: the deepest facet after its solo phase, each shallower facet when its
fade-in ends, every facet every `refit_every` steps after the schedule; each refit moves only the facets due and
puts their means on a fresh mixture fit of the posterior means."""

from __future__ import annotations

import torch
from rich.console import Console
from sklearn.mixture import GaussianMixture

from cmvae_engine.cmvae.clustering import to_float
from cmvae_engine.cmvae.mfcvae.config import MFCVAEConfig
from cmvae_engine.cmvae.mfcvae.model import MFCVAE
from cmvae_engine.engine.mfcvae_recipe import ProgressiveRecipe
from cmvae_engine.engine.recipes import StepContext


def _setup(refit_every=0, facets=3):
    cfg = MFCVAEConfig(n_facets=facets, n_clusters=[2, 3, 4][:facets], z_dims=[2] * facets,
                       hidden=[12, 10, 8][:facets], image_channels=1, image_size=4, refit=True,
                       refit_every=refit_every, solo_steps=10, fade_steps=5)
    torch.manual_seed(0)
    model = MFCVAE(cfg)
    images = torch.randint(0, 256, (1, 300, 1, 4, 4), dtype=torch.uint8)
    return cfg, model, ProgressiveRecipe(cfg, seed=3), images


def _ctx(step, model, images):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return StepContext(step=step, epoch=0, model=model, optimizer=opt, train_images=images,
                       device=torch.device("cpu"), console=Console(quiet=True))


def _locs(model):
    return [loc.detach().clone() for loc in model.priors.loc]


def test_refit_steps_follow_the_schedule():
    cfg, _, recipe, _ = _setup()
    # deepest (facet 2): end of solo = 10; facet 1 fades 10..15; facet 0 starts after 10 more solo steps: 25..30
    assert [recipe.refit_step(j) for j in range(3)] == [30, 15, 10]


def test_each_scheduled_refit_moves_only_its_facet():
    cfg, model, recipe, images = _setup()
    for step, facet in ((10, 2), (15, 1), (30, 0)):
        before = _locs(model)
        recipe.after_step(_ctx(step, model, images))
        after = _locs(model)
        assert [not torch.equal(b, a) for b, a in zip(before, after, strict=True)] == [j == facet for j in range(3)]
        assert recipe.events()[-1] == {"event": "gmm_refit", "step": step, "facet": facet, "points": 300}
    n = len(recipe.events())
    for step in (9, 11, 31, 100):  # no refit_every: nothing more
        recipe.after_step(_ctx(step, model, images))
    assert len(recipe.events()) == n


def test_periodic_refits_fit_every_facet_to_its_posterior_means():
    cfg, model, recipe, images = _setup(refit_every=7, facets=2)
    end = 15  # schedule end of 2 facets: solo 10 + fade 5
    recipe.after_step(_ctx(end + 3, model, images))
    assert recipe.events() == []
    recipe.after_step(_ctx(end + 7, model, images))
    assert [e["facet"] for e in recipe.events()] == [0, 1]
    with torch.no_grad():
        means = [m for m, _ in model.posterior(to_float(images[0]))]
    for j, k in enumerate(cfg.n_clusters):
        # an independent fit of the same points lands on the same means (up to the order of the clusters)
        gmm = GaussianMixture(k, covariance_type="diag", random_state=0, n_init=8).fit(means[j].double().numpy())
        got = model.priors.loc[j].detach().double()
        ref = torch.as_tensor(gmm.means_)
        dist = torch.cdist(got, ref)
        assert float(dist.min(1).values.max()) < 0.05 * float(torch.cdist(ref, ref).max())
    recipe.after_step(_ctx(end + 14, model, images))
    assert len(recipe.events()) == 4


def test_refit_is_off_without_the_switch():
    cfg, model, recipe, images = _setup()
    cfg.refit = False
    before = _locs(model)
    for step in (10, 15, 30):
        recipe.after_step(_ctx(step, model, images))
    assert recipe.events() == [] and all(torch.equal(a, b) for a, b in zip(before, _locs(model), strict=True))
