"""The `contrast` element of the `fast` recipe: a contrastive warm start of the z towers.

Measured on polydigits (docs/recipes.md): under the CMVAE objective alone the z towers barely start to
separate the classes in 1,000 steps, because the encoders get a useful signal only through decoders that
already read z, and the decoders learn to read z only once it carries something. Cross-modal InfoNCE on the
posterior means (cmvae/alignment.py) breaks that circle at a fraction of the cost: it runs the z towers only.

The warm start, before the first CMVAE step:
1. `contrast_steps` steps of InfoNCE on the z towers alone (their own Adam; nothing else changes);
2. each modality's loc head is shifted and scaled so that its posterior means are centred with an RMS spread of
   `contrast_spread` per dimension (the InfoNCE is scale-free; the Laplace posteriors' scales average 1, so
   means of spread ~0.2 would be buried in the sampling noise the decoders see);
3. during the first `contrast_anneal_steps` CMVAE steps the same InfoNCE is added to the loss with a weight that
   falls linearly to zero (it holds the modalities together while the decoders learn to read z).
The objective the run ends on is the CMVAE objective, unchanged.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from rich.console import Console

from cmvae_engine.cmvae.alignment import cross_modal_infonce
from cmvae_engine.cmvae.clustering import probe_means, to_float
from cmvae_engine.cmvae.model import CMVAE
from cmvae_engine.engine.checkpoint import unwrap
from cmvae_engine.engine.config import FastRecipeConfig
from cmvae_engine.engine.progress import Board, format_duration, phase

# Seeds the warm start's batches (with the run's seed and the step, so that a resumed warm start draws the same).
_WARM_SEED = 7_700_417


@dataclass
class WarmStartContext:
    """What a recipe may use before the first training step."""

    model: CMVAE
    train_images: torch.Tensor | None
    """uint8 [M, N, C, H, W] on the training device; None for a streaming loader."""
    device: torch.device
    batch_size: int
    seed: int
    console: Console
    should_stop: Callable[[], bool] = lambda: False
    """Polled every step: True makes the warm start return early with its progress in the recipe's state."""
    board: Board | None = None
    """Where the warm start shows its progress bar (None: nowhere)."""


def z_tower_parameters(model: CMVAE) -> list[torch.nn.Parameter]:
    return [p for enc in model.encoders for p in enc.tower_z.parameters() if p.requires_grad]


def z_means(model: CMVAE, x: torch.Tensor) -> torch.Tensor:
    """Posterior means of z [M, B, Dz] for float images x [M, B, C, H, W] (with gradient)."""
    return torch.stack([enc.tower_z(x[m])[0] for m, enc in enumerate(model.encoders)]).float()


class ContrastWarmStart:
    """Runs steps 1-2 once per run (resumable step by step) and gives step 3's weight."""

    def __init__(self, cfg: FastRecipeConfig):
        self.cfg = cfg
        self.step = 0
        self.done = False
        self.skipped = False
        """No training images on the device (a streaming loader): nothing was trained and no term is added."""
        self.losses: list[tuple[int, float]] = []
        """(step, InfoNCE) every 50 warm-start steps: read on the host only then."""
        self.spread_before: list[float] = []
        self.seconds: float | None = None
        """Wall time of the warm start in the session that finished it."""
        self._opt_state: dict | None = None

    def weight(self, step: int) -> float:
        """Weight of the InfoNCE term at CMVAE step `step` (0-based), in nats per tuple per unit of InfoNCE."""
        c = self.cfg
        if not self.done or self.skipped or step >= c.contrast_anneal_steps:
            return 0.0
        return c.contrast_weight * (1.0 - step / c.contrast_anneal_steps)

    def skip(self) -> None:
        self.done = self.skipped = True

    def run(self, ctx: WarmStartContext) -> None:
        if self.done:
            return
        c = self.cfg
        model = unwrap(ctx.model)
        images = ctx.train_images
        params = z_tower_parameters(model)
        opt = torch.optim.Adam(params, lr=c.contrast_lr, amsgrad=True)
        if self._opt_state is not None:
            opt.load_state_dict(self._opt_state)
        n = images.shape[1]
        batch = min(ctx.batch_size, n)
        g = torch.Generator(device="cpu")
        model.train()
        t0, first = time.perf_counter(), self.step
        with phase(ctx.board, "fast recipe: contrastive warm start of the z towers", c.contrast_steps,
                   done_line=False) as bar:
            bar(self.step, c.contrast_steps)
            while self.step < c.contrast_steps:
                if ctx.should_stop():
                    self._opt_state = opt.state_dict()
                    ctx.console.print(f"fast recipe: contrastive warm start stopped at step {self.step} of "
                                      f"{c.contrast_steps}; --resume continues it")
                    return
                g.manual_seed(_WARM_SEED + 1_000_003 * ctx.seed + self.step)
                idx = torch.randint(0, n, (batch,), generator=g).to(images.device)
                loss = cross_modal_infonce(z_means(model, to_float(images.index_select(1, idx))), c.contrast_tau)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                self.step += 1
                bar(self.step, c.contrast_steps)
                if self.step % 50 == 0 or self.step == c.contrast_steps:
                    self.losses.append((self.step, float(loss.detach())))  # sync point (every 50 steps)
                    bar.note(f"InfoNCE {self.losses[-1][1]:.3f}")
        self.seconds = time.perf_counter() - t0
        self._opt_state = None
        self._rescale(model, images)
        if dist.is_available() and dist.is_initialized():
            for p in params:
                dist.broadcast(p.data, src=0)  # every rank continues from rank 0's towers
        self.done = True
        last = self.losses[-1][1] if self.losses else float("nan")
        ctx.console.print(f"fast recipe: contrastive warm start done in {format_duration(self.seconds)} "
                          f"({self.step - first} of {c.contrast_steps} z-tower steps this session, InfoNCE "
                          f"{last:.3f}; means rescaled to spread {c.contrast_spread:g})")

    @torch.no_grad()
    def _rescale(self, model: CMVAE, images: torch.Tensor, n_probe: int = 2048) -> None:
        """Centre each modality's posterior means and give them RMS spread `contrast_spread` per dimension, by
        an affine change of the loc head (loc = W h + b  ->  f (W h + b - mean))."""
        means = probe_means(model, images[:, :n_probe])  # [M, N, Dz]
        self.spread_before = []
        for loc, enc in zip(means, model.encoders, strict=True):
            head = enc.tower_z.loc
            spread = loc.var(0).mean().sqrt().clamp_min(1e-12)
            f = self.cfg.contrast_spread / spread
            head.weight.mul_(f.to(head.weight.dtype))
            head.bias.copy_((head.bias - loc.mean(0)) * f)
            self.spread_before.append(float(spread))

    def state_dict(self) -> dict:
        return {"step": self.step, "done": self.done, "skipped": self.skipped, "losses": self.losses,
                "spread_before": self.spread_before, "seconds": self.seconds, "optimizer": self._opt_state}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state.get("step", 0))
        self.done = bool(state.get("done", False))
        self.skipped = bool(state.get("skipped", False))
        self.losses = [tuple(x) for x in state.get("losses", [])]
        self.spread_before = list(state.get("spread_before", []))
        self.seconds = state.get("seconds")
        self._opt_state = state.get("optimizer")
