"""Training recipes: hooks the loop calls at fixed points.

`Recipe` is the generic base every task's recipe derives from: one parameter group, no step scalars, no hooks.
`PaperRecipe` is CMVAE's reference procedure (a constant beta, nothing added); `fast` (engine/fast_recipe.py)
reaches a clustered CMVAE sooner.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from rich.console import Console
from torch import nn

from cmvae_engine.cmvae.model import Posterior
from cmvae_engine.engine.config import RECIPES, FastRecipeConfig
from cmvae_engine.engine.warm_start import WarmStartContext


@dataclass
class StepContext:
    """What a recipe may look at after an optimiser step."""

    step: int
    epoch: int
    model: nn.Module
    optimizer: torch.optim.Optimizer
    train_images: torch.Tensor | None
    """uint8 [M, N, C, H, W], resident on the training device (None for streaming loaders)."""
    device: torch.device
    console: Console


class Recipe:
    name = "default"

    def param_groups(self, model: nn.Module, lr: float) -> list[dict]:
        """Optimiser parameter groups (default: one group, one learning rate)."""
        return [{"params": [p for p in model.parameters() if p.requires_grad], "lr": lr}]

    def scalars(self, step: int) -> dict[str, float]:
        """Values the objective reads at the 0-based step (e.g. beta), handed to it as device tensors so that a
        changing value neither syncs nor recompiles. The keys must be the same at every step."""
        del step
        return {}

    def after_step(self, ctx: StepContext) -> None:
        """Called after every optimiser step; must not sync the host except on rare events."""

    def warm_start(self, ctx: WarmStartContext) -> bool:
        """Called before the first training step (again on a resume at step 0: it then finishes what was left).
        Returns whether it changed the model. Default: nothing."""
        del ctx
        return False

    def active_elements(self) -> list[str]:
        """Names of the elements that change the reference procedure (default: none)."""
        return []

    def events(self) -> list[dict]:
        """What the recipe did so far, each a dict with `event` (a name) and `step`, in the order it happened;
        the list only grows. The loop hands new ones to the logging sinks at log intervals (steps.jsonl, the
        report's curves); building it must not read the device."""
        return []

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        del state


class PaperRecipe(Recipe):
    """CMVAE's reference procedure: the objective at a constant beta, one learning rate."""

    name = "paper"

    def __init__(self, beta: float = 2.5):
        self.base_beta = beta

    def beta(self, step: int, base: float) -> float:
        """beta at a step (the paper: constant)."""
        del step
        return base

    def aux_loss(self) -> Callable[[Posterior], torch.Tensor] | None:
        """A term added to the loss, times `aux_weight(step)` (the paper: none, and the loss is the objective's)."""
        return None

    def aux_weight(self, step: int) -> float:
        """Weight of `aux_loss` at the 0-based step."""
        del step
        return 0.0

    def scalars(self, step: int) -> dict[str, float]:
        return {"beta": self.beta(step, self.base_beta), "aux_weight": self.aux_weight(step)}




def build_recipe(name: str, fast: FastRecipeConfig | None = None, beta: float = 2.5) -> PaperRecipe:
    """CMVAE's recipe called `name` at the configured beta; `fast` configures the `fast` recipe (default
    settings when None)."""
    if name == "paper":
        return PaperRecipe(beta)
    if name == "fast":
        from cmvae_engine.engine.fast_recipe import FastRecipe  # imports this module: resolved at call time

        return FastRecipe(fast, beta=beta)
    raise ValueError(f"unknown recipe {name!r} (--recipe); expected one of {', '.join(RECIPES)}")
