"""Training recipes: hooks the loop calls at fixed points. The base class is the `paper` recipe, which
changes nothing (the reference procedure); `fast` (engine/fast_recipe.py) reaches a clustered model sooner."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from rich.console import Console

from cmvae_engine.cmvae.model import CMVAE, Posterior
from cmvae_engine.engine.config import FastRecipeConfig
from cmvae_engine.engine.warm_start import WarmStartContext


@dataclass
class StepContext:
    """What a recipe may look at after an optimiser step."""

    step: int
    epoch: int
    model: CMVAE
    optimizer: torch.optim.Optimizer
    train_images: torch.Tensor
    """uint8 [M, N, C, H, W], resident on the training device."""
    device: torch.device
    console: Console


class Recipe:
    name = "paper"

    def param_groups(self, model: CMVAE, lr: float) -> list[dict]:
        """Optimiser parameter groups (the paper: one group, one learning rate)."""
        return [{"params": [p for p in model.parameters() if p.requires_grad], "lr": lr}]

    def beta(self, step: int, base: float) -> float:
        """beta at a step (the paper: constant)."""
        return base

    def after_step(self, ctx: StepContext) -> None:
        """Called after every optimiser step; must not sync the host except on rare events."""

    def warm_start(self, ctx: WarmStartContext) -> bool:
        """Called before the first training step (again on a resume at step 0: it then finishes what was left).
        Returns whether it changed the model. The paper: nothing."""
        del ctx
        return False

    def aux_loss(self) -> Callable[[Posterior], torch.Tensor] | None:
        """A term added to the loss, times `aux_weight(step)` (the paper: none, and the loss is the objective's)."""
        return None

    def aux_weight(self, step: int) -> float:
        """Weight of `aux_loss` at the 0-based step."""
        del step
        return 0.0

    def active_elements(self) -> list[str]:
        """Names of the elements that change the reference procedure (the paper: none)."""
        return []

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        del state


RECIPES = ("paper", "fast")


def build_recipe(name: str, fast: FastRecipeConfig | None = None) -> Recipe:
    """The recipe called `name`; `fast` configures the `fast` recipe (default settings when None)."""
    if name == "paper":
        return Recipe()
    if name == "fast":
        from cmvae_engine.engine.fast_recipe import FastRecipe  # imports this module: resolved at call time

        return FastRecipe(fast)
    raise ValueError(f"unknown recipe {name!r} (--recipe); expected one of {', '.join(RECIPES)}")
