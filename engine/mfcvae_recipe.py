"""MFCVAE's training recipe: the progressive schedule of its facets as step scalars, and the released code's
one-off initialisation of the cluster means before the first step.

- scalars(step): `alpha` (the decoder rung weights) and `kl_weight` (the facets' KL weights), one entry per facet,
  both cmvae/mfcvae/schedule.py's facet_weights: a pure function of the step, so a resumed run continues the
  schedule exactly.
- warm_start: each facet's cluster means from a diagonal Gaussian mixture (scikit-learn, seeded by the run's
  seed) fitted to the untrained encoder's posterior means of (a subset of) the training split; done once, and
  recorded in the recipe state.
"""

from __future__ import annotations

import numpy as np
import torch

from cmvae_engine.cmvae.clustering import to_float
from cmvae_engine.cmvae.mfcvae.config import MFCVAEConfig
from cmvae_engine.cmvae.mfcvae.model import MFCVAE
from cmvae_engine.cmvae.mfcvae.schedule import facet_weights, fade_start, schedule_end
from cmvae_engine.engine.checkpoint import unwrap
from cmvae_engine.engine.recipes import Recipe, StepContext
from cmvae_engine.engine.warm_start import WarmStartContext

GMM_POINTS = 10000
"""Training images encoded for the initial mixture fit (all of them in smaller sets)."""
GMM_RESTARTS = 4
"""Fits from different k-means starts, the best kept: one start often merges two clusters and splits another."""


class ProgressiveRecipe(Recipe):
    name = "progressive"

    def __init__(self, cfg: MFCVAEConfig, seed: int = 0):
        self.cfg = cfg
        self.seed = seed
        self.gmm_done = False
        self._events: list[dict] = []

    def scalars(self, step: int) -> dict:
        w = tuple(facet_weights(step, self.cfg.n_facets, self.cfg.solo_steps, self.cfg.fade_steps))
        return {"alpha": w, "kl_weight": w}

    @torch.no_grad()
    def warm_start(self, ctx: WarmStartContext) -> bool:
        if not self.cfg.gmm_init or self.gmm_done:
            return False
        if ctx.train_images is None:
            ctx.console.print("mfcvae: a streaming loader gives no resident training split; the cluster means keep "
                              "their random start (no mixture fit)", style="yellow")
            self.gmm_done = True
            return False
        model: MFCVAE = unwrap(ctx.model)
        n = self._fit(model, ctx.train_images[0], list(range(model.n_facets)), self.seed)
        self.gmm_done = True
        self._events.append({"event": "gmm_init", "step": 0, "points": n})
        ctx.console.print(f"mfcvae: cluster means of {model.n_facets} facets from a diagonal Gaussian mixture on "
                          f"{n} training images' posterior means", style="dim")
        return True

    def after_step(self, ctx: StepContext) -> None:
        """With `refit`: facet j's mixture (means, variances, weights) again from a fit to its posterior means at
        refit_step(j), once its head has trained (a fixed step, so a resumed run does the same)."""
        if not self.cfg.refit or ctx.train_images is None:
            return
        periodic = self._periodic(ctx.step)
        due = [j for j in range(self.cfg.n_facets) if periodic or ctx.step == self.refit_step(j)]
        if due:
            n = self._fit(unwrap(ctx.model), ctx.train_images[0], due, self.seed + 1000 * ctx.step, with_weights=True)
            self._events += [{"event": "gmm_refit", "step": ctx.step, "facet": j, "points": n} for j in due]

    def _periodic(self, step: int) -> bool:
        """Every `refit_every` steps once the schedule has ended (and its own refits are done)."""
        end = schedule_end(self.cfg.n_facets, self.cfg.solo_steps, self.cfg.fade_steps)
        every = self.cfg.refit_every
        return bool(every) and step > end and (step - end) % every == 0

    def refit_step(self, j: int) -> int:
        """The step after which facet j's mixture is fitted again: the end of the solo phase for the deepest facet
        (it trained alone from the start), the end of its fade-in for a shallower one."""
        rank = self.cfg.n_facets - 1 - j
        if rank == 0:
            return self.cfg.solo_steps
        return fade_start(rank, self.cfg.solo_steps, self.cfg.fade_steps) + self.cfg.fade_steps

    @torch.no_grad()
    def _fit(self, model: MFCVAE, images: torch.Tensor, facets: list[int], seed: int,
             with_weights: bool = False) -> int:
        """Fit a diagonal Gaussian mixture per facet in `facets` to the posterior means of (a seeded subset of) the
        uint8 training images [N, C, H, W]; its means become the cluster means (and, `with_weights`, its weights
        the cluster weights, its variances the cluster variances). Returns the number of images used."""
        from sklearn.mixture import GaussianMixture  # deferred: sklearn is slow to import

        was_training = model.training
        model.eval()
        pick = np.random.default_rng(seed).permutation(images.shape[0])[:GMM_POINTS]
        means = [[] for _ in range(model.n_facets)]
        for start in range(0, len(pick), 1024):
            x = to_float(images[torch.as_tensor(pick[start:start + 1024], device=images.device)])
            for j, (m, _) in enumerate(model.posterior(x)):
                means[j].append(m.float().cpu().double())
        for j in facets:
            gmm = GaussianMixture(self.cfg.n_clusters[j], covariance_type="diag", random_state=seed + j,
                                  reg_covar=1e-6, max_iter=200, n_init=GMM_RESTARTS).fit(torch.cat(means[j]).numpy())
            pri = model.priors
            pri.loc[j].copy_(torch.as_tensor(gmm.means_, dtype=pri.loc[j].dtype))
            if with_weights:
                var = torch.as_tensor(gmm.covariances_, dtype=pri.raw_var[j].dtype).clamp_min(1e-4)
                pri.raw_var[j].copy_(torch.log(torch.expm1(10.0 * var)) / 10.0)  # softplus(beta = 10) inverse
                if self.cfg.learn_pi:
                    pri.pi_logits[j].copy_(torch.as_tensor(np.log(gmm.weights_), dtype=pri.pi_logits[j].dtype))
        model.train(was_training)
        return int(len(pick))

    def active_elements(self) -> list[str]:
        return ["progressive", *(["gmm-init"] if self.cfg.gmm_init else [])]

    def events(self) -> list[dict]:
        return list(self._events)

    def state_dict(self) -> dict:
        return {"gmm_done": self.gmm_done, "events": list(self._events)}

    def load_state_dict(self, state: dict) -> None:
        self.gmm_done = bool(state.get("gmm_done", False))
        self._events = list(state.get("events", []))
