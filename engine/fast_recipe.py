"""The `fast` recipe: the same model and the same final objective as `paper`, reached in far fewer steps.

The mixture prior is the bottleneck of the reference procedure (DESIGN section 8): the representation separates
the classes long before cluster means moving ~1e-3 per step find them, and a prior fitted too early (before the
representation separates) changes nothing. So the recipe watches the representation with a label-free signal
and fits the prior to it once it has formed:

- probe: posterior means of z for a fixed random subset of the training tuples, every `check_every` steps;
- trigger: k-means (the model's K) on the probe's means pooled over modalities; the cross-modal agreement is
  the mean pairwise ARI between the modalities' assignments of the same tuples (0 by chance). The modalities share only
  the content (the class), so agreement rises as z comes to encode it; the prior is fitted once the
  agreement is at least `agree_min` and has levelled off;
- fit: prior means <- centroids, mixing weights <- cluster sizes, learned scales <- per-cluster spread; the
  prior's optimiser state is reset and, with `prior-lr`, its learning rate multiplied;
- refit: when the clusters in use collapse below a fraction of those in use right after the last fit;
- contrast: before the first step, a contrastive warm start of the z towers, faded out early in training
  (engine/warm_start.py): the representation, not the prior, is what the reference procedure waits for first;
- optional beta warm-up and network learning-rate scaling (measured; see docs/recipes.md for which pay).

Every element switches off on its own (FastRecipeConfig); the host reads device values only at checks.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from cmvae_engine.cmvae.alignment import cross_modal_infonce
from cmvae_engine.cmvae.clustering import probe_means  # called through this module's name: replaceable
from cmvae_engine.cmvae.model import CMVAE, Posterior
from cmvae_engine.engine.checkpoint import unwrap
from cmvae_engine.engine.config import FastRecipeConfig
from cmvae_engine.engine.kmeans import kmeans
from cmvae_engine.engine.recipes import PaperRecipe, StepContext
from cmvae_engine.engine.warm_start import ContrastWarmStart, WarmStartContext

PRIOR_PARAMS = ("prior_logits", "prior_loc", "prior_raw_scale")
# Seeds the probe subset and k-means; a constant so that every rank of a data-parallel run draws the same.
_PROBE_SEED = 20_251_121


def prior_parameters(model: CMVAE) -> list[torch.nn.Parameter]:
    return [getattr(model, n) for n in PRIOR_PARAMS if getattr(model, n).requires_grad]


def _contingency(a: torch.Tensor, b: torch.Tensor, k: int) -> torch.Tensor:
    """Counts [k, k] (float64) of the label pairs of two labelings a, b [N] with ids in 0..k-1."""
    flat = torch.zeros(k * k, dtype=torch.float64, device=a.device)
    return flat.index_add_(0, a * k + b, torch.ones_like(a, dtype=torch.float64)).view(k, k)


def nmi(a: torch.Tensor, b: torch.Tensor, k: int) -> torch.Tensor:
    """Arithmetic-mean NMI of two labelings a, b [N] with ids in 0..k-1, on the device (scalar tensor)."""
    joint = _contingency(a, b, k) / a.numel()
    pa, pb = joint.sum(1), joint.sum(0)

    def entropy(p: torch.Tensor) -> torch.Tensor:
        return -(p * torch.log(p.clamp_min(1e-300))).sum()

    outer = pa[:, None] * pb[None, :]
    mi = (joint * (torch.log(joint.clamp_min(1e-300)) - torch.log(outer.clamp_min(1e-300)))).sum()
    denom = 0.5 * (entropy(pa) + entropy(pb))
    return torch.where(denom > 0, mi / denom.clamp_min(1e-300), torch.ones_like(mi))


def ari(a: torch.Tensor, b: torch.Tensor, k: int) -> torch.Tensor:
    """Adjusted Rand index of two labelings a, b [N] with ids in 0..k-1 (0 expected by chance; scalar tensor)."""
    n = _contingency(a, b, k)

    def pairs(x: torch.Tensor) -> torch.Tensor:
        return (x * (x - 1) / 2).sum()

    total = a.numel() * (a.numel() - 1) / 2
    index, sa, sb = pairs(n), pairs(n.sum(1)), pairs(n.sum(0))
    expected = sa * sb / total
    top = 0.5 * (sa + sb)
    return torch.where(top > expected, (index - expected) / (top - expected).clamp_min(1e-300), torch.ones_like(top))


def cross_modal_agreement(labels: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """labels [M, N] (cluster of each modality's point of the same tuple) -> mean pairwise (ARI, NMI).

    NMI of independent labelings is biased upwards (~0.2 for K=40 on 1,024 tuples); ARI is 0 by chance."""
    m = labels.shape[0]
    idx = [(i, j) for i in range(m) for j in range(i + 1, m)]
    return (torch.stack([ari(labels[i], labels[j], k) for i, j in idx]).mean(),
            torch.stack([nmi(labels[i], labels[j], k) for i, j in idx]).mean())


class FastRecipe(PaperRecipe):
    name = "fast"

    def __init__(self, config: FastRecipeConfig | None = None, beta: float = 2.5):
        super().__init__(beta)
        self.cfg = config or FastRecipeConfig()
        self.fitted_at: int | None = None
        self.fits: list[dict] = []
        """One entry per fit: step, reason, agreement, clusters in use right after."""
        self.checks: list[dict] = []
        """One entry per check: step, agreement (before the first fit) or clusters in use (after)."""
        self._probe: torch.Tensor | None = None
        self._prior_group: int | None = None
        self._base_lr = 0.0
        self._usage_after_fit = 0
        self._warned = False
        self.warm = ContrastWarmStart(self.cfg) if self.cfg.contrast else None

    # ----- hooks -------------------------------------------------------------------------------------------
    def param_groups(self, model: CMVAE, lr: float) -> list[dict]:
        model = unwrap(model)
        self._base_lr = lr
        prior = prior_parameters(model)
        prior_ids = {id(p) for p in prior}
        nets = [p for p in model.parameters() if p.requires_grad and id(p) not in prior_ids]
        net_lr = lr * self.cfg.lr_mult if self.cfg.lr_scale else lr
        groups = [{"params": nets, "lr": net_lr}]
        if prior:
            self._prior_group = 1
            groups.append({"params": prior, "lr": self._prior_lr()})
        return groups

    def beta(self, step: int, base: float) -> float:
        c = self.cfg
        if not c.beta_warmup or step >= c.warmup_steps:
            return base
        return base * (c.beta_start + (1.0 - c.beta_start) * step / c.warmup_steps)

    def active_elements(self) -> list[str]:
        return self.cfg.active()

    def warm_start(self, ctx: WarmStartContext) -> bool:
        if self.warm is None or self.warm.done:
            return False
        if ctx.train_images is None:
            ctx.console.print("[yellow]fast recipe:[/] this loader keeps no training images on the device; "
                              "the contrastive warm start is skipped (use --loader resident)")
            self.warm.skip()
            return False
        self.warm.run(ctx)
        return True

    def aux_loss(self):
        if self.warm is None:
            return None
        tau = self.cfg.contrast_tau

        def contrast(post: Posterior) -> torch.Tensor:
            # per tuple, like the objective's terms: the loss is a sum over the batch
            return cross_modal_infonce(post.z_loc, tau) * post.z_loc.shape[1]

        return contrast

    def aux_weight(self, step: int) -> float:
        return 0.0 if self.warm is None else self.warm.weight(step)

    def after_step(self, ctx: StepContext) -> None:
        c = self.cfg
        if not c.init or ctx.step % c.check_every or ctx.step < c.min_steps:
            return
        model = unwrap(ctx.model)
        if model.config.kind != "cmvae":
            return
        if ctx.train_images is None:
            if not self._warned:
                ctx.console.print("[yellow]fast recipe:[/] this loader keeps no training images on the device; "
                                  "the prior fit and refit are skipped (use --loader resident)")
                self._warned = True
            return
        if self.fitted_at is None:
            self._check_trigger(ctx, model)
        elif c.refit and len(self.fits) - 1 < c.max_refits:
            self._check_collapse(ctx, model)

    def events(self) -> list[dict]:
        """Warm-start losses (at CMVAE step 0), then every check and fit in step order (a fit follows the check
        that triggered it)."""
        out: list[dict] = []
        if self.warm is not None and self.warm.done and not self.warm.skipped:
            out += [{"event": "warm_start_loss", "step": 0, "warm_step": s, "infonce": v} for s, v in self.warm.losses]
            out.append({"event": "warm_start_done", "step": 0, "warm_steps": self.warm.step,
                        "seconds": self.warm.seconds, "spread_before": self.warm.spread_before})
        timeline = [(c["step"], 0, {"event": "check", **c}) for c in self.checks]
        timeline += [(f["step"], 1, {"event": "prior_fit" if i == 0 else "prior_refit", **f})
                     for i, f in enumerate(self.fits)]
        return out + [e for _, _, e in sorted(timeline, key=lambda t: t[:2])]

    # ----- the two checks ----------------------------------------------------------------------------------
    def _probe_images(self, images: torch.Tensor) -> torch.Tensor:
        if self._probe is None or self._probe.device != images.device:
            g = torch.Generator(device="cpu").manual_seed(_PROBE_SEED)
            idx = torch.randperm(images.shape[1], generator=g)[:self.cfg.probe_size]
            self._probe = idx.sort().values.to(images.device)
        return images.index_select(1, self._probe)

    def _kmeans(self, model: CMVAE, means: torch.Tensor):
        k = min(model.config.n_clusters, means.shape[0] * means.shape[1])
        g = torch.Generator(device=means.device).manual_seed(_PROBE_SEED + len(self.checks))
        return kmeans(means.flatten(0, 1), k, restarts=self.cfg.kmeans_restarts, generator=g)

    def _check_trigger(self, ctx: StepContext, model: CMVAE) -> None:
        c = self.cfg
        means = probe_means(model, self._probe_images(ctx.train_images))
        km = self._kmeans(model, means)
        agree_t, nmi_t = cross_modal_agreement(km.labels.view(means.shape[:2]), km.centroids.shape[0])
        agree, agree_nmi = float(agree_t), float(nmi_t)  # sync point
        prev = self.checks[-1]["agreement"] if self.checks else None
        self.checks.append({"step": ctx.step, "agreement": agree, "agreement_nmi": agree_nmi,
                            "inertia_ratio": float(km.inertia / ((means - means.mean((0, 1))) ** 2).sum())})
        levelled = prev is not None and agree - prev < c.agree_plateau
        reason = None
        if agree >= c.agree_min and levelled:
            reason = "agreement levelled off"
        elif ctx.step >= c.max_wait_steps:
            reason = "max_wait_steps"
        if reason:
            self._fit(ctx, model, means, km, reason, agree)

    def _check_collapse(self, ctx: StepContext, model: CMVAE) -> None:
        means = probe_means(model, self._probe_images(ctx.train_images))
        usage = self._usage(model, means)
        self.checks.append({"step": ctx.step, "in_use": usage})
        if usage < self.cfg.collapse_frac * self._usage_after_fit:
            self._fit(ctx, model, means, self._kmeans(model, means), f"collapse to {usage} clusters", None)

    @torch.no_grad()
    def _usage(self, model: CMVAE, means: torch.Tensor) -> int:
        _, resp, _ = model.cluster_posterior(means.flatten(0, 1))
        share = torch.bincount(resp.argmax(-1), minlength=resp.shape[-1]).float() / resp.shape[0]
        return int((share >= self.cfg.min_share).sum())  # sync point

    # ----- the fit -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def _fit(self, ctx: StepContext, model: CMVAE, means: torch.Tensor, km, reason: str,
             agree: float | None) -> None:
        x = means.flatten(0, 1)
        k = km.centroids.shape[0]
        loc = model.prior_loc.detach().clone()
        loc[:k] = km.centroids
        counts = km.counts.float().clamp_min(1.0)
        logits = torch.full_like(model.prior_logits, math.log(0.5 / x.shape[0]))
        logits[:k] = torch.log(counts / x.shape[0])
        model.prior_loc.copy_(loc)
        model.prior_logits.copy_(logits - logits.logsumexp(0))
        if model.prior_raw_scale.requires_grad:
            model.prior_raw_scale.copy_(self._raw_scales(model, x, km))
        if dist.is_available() and dist.is_initialized():
            for p in (model.prior_loc, model.prior_logits, model.prior_raw_scale):
                dist.broadcast(p.data, src=0)  # every rank continues from rank 0's fit
        opt = ctx.optimizer
        for p in prior_parameters(model):
            opt.state.pop(p, None)  # stale Adam moments would drag the new means back
        if self.fitted_at is None:
            self.fitted_at = ctx.step
        if self._prior_group is not None:
            opt.param_groups[self._prior_group]["lr"] = self._prior_lr()
        self._usage_after_fit = self._usage(model, means)
        self.fits.append({"step": ctx.step, "reason": reason, "agreement": agree, "in_use": self._usage_after_fit})
        ctx.console.print(f"fast recipe: prior fitted at step {ctx.step} ({reason}; "
                          f"{self._usage_after_fit} clusters in use)")

    def _raw_scales(self, model: CMVAE, x: torch.Tensor, km) -> torch.Tensor:
        """Per-cluster spread of the points around their centroid, in the prior's raw parameterisation."""
        k = km.centroids.shape[0]
        raw = model.prior_raw_scale.detach().clone()
        dev = x - km.centroids[km.labels]
        denom = km.counts.float().clamp_min(1.0)[:, None]
        if model.config.family == "laplace":
            spread = torch.zeros_like(km.centroids).index_add_(0, km.labels, dev.abs()) / denom
            raw[:k] = torch.log(spread.clamp_min(1e-3))  # softmax * D keeps the shape; each block sums to D
        else:
            std = (torch.zeros_like(km.centroids).index_add_(0, km.labels, dev * dev) / denom).sqrt().clamp_min(1e-3)
            raw[:k] = torch.log(torch.expm1(std))  # inverse softplus
        return raw

    def _prior_lr(self) -> float:
        """The networks' learning rate, times prior_lr_mult from the first fit on (with prior-lr)."""
        c = self.cfg
        if c.prior_lr and self.fitted_at is not None:
            return self._base_lr * c.prior_lr_mult
        return self._base_lr * (c.lr_mult if c.lr_scale else 1.0)

    # ----- resume ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        state = {"fitted_at": self.fitted_at, "fits": self.fits, "checks": self.checks,
                 "usage_after_fit": self._usage_after_fit}
        if self.warm is not None:
            state["warm_start"] = self.warm.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.fitted_at = state.get("fitted_at")
        self.fits = list(state.get("fits", []))
        self.checks = list(state.get("checks", []))
        self._usage_after_fit = int(state.get("usage_after_fit", 0))
        if self.warm is not None and "warm_start" in state:
            self.warm.load_state_dict(state["warm_start"])
