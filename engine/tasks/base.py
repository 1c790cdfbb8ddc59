"""The seam between the training loop and a model family.

The loop (engine/trainer.py) knows batches, an optimiser, a step, checkpoints and a metrics file; everything that
depends on what is being trained comes from a `Task`: the model it builds from the config, the objective module
the step differentiates, the recipe (step scalars, parameter groups, hooks), the networks that autocast wraps, the
evaluation columns of the metrics rows and the files written at the end. One task per model family (CMVAE and
MMVAE+, and every family added later); none of them has a loop of its own.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:  # annotations only: the loop's modules import this one
    from cmvae_engine.cmvae.progress import ProgressFn
    from cmvae_engine.engine.config import TrainConfig
    from cmvae_engine.engine.recipes import Recipe
    from cmvae_engine.engine.step import StepOptions
    from cmvae_engine.engine.trainer import SplitData


class Task:
    """How one model family trains. Subclasses override what differs; the defaults suit a plain module."""

    kind = ""
    """The `model.kind` values this task serves are registered in engine/tasks/__init__.py."""

    def adapt_config(self, cfg: TrainConfig, data_info: dict) -> None:
        """Settle config fields that the data decides (e.g. the number of modalities), in place, before the
        model is built and the config is written to the run folder."""

    def build_model(self, cfg: TrainConfig) -> nn.Module:
        """The trainable model, on the CPU, freshly initialised from the current torch seed."""
        raise NotImplementedError

    def build_recipe(self, cfg: TrainConfig) -> Recipe:
        """Step scalars, parameter groups and hooks; the default has none."""
        from cmvae_engine.engine.recipes import Recipe

        return Recipe()

    def build_objective(self, model: nn.Module, cfg: TrainConfig, recipe: Recipe, loss_scale: float) -> nn.Module:
        """The module the step calls and differentiates: forward(batch, scalars) -> (loss, reported_sum).

        `scalars` maps each name of recipe.scalars(step) to a 0-d (or 1-d) device tensor; `loss` is what the
        optimiser minimises (times loss_scale: the world size under DDP, whose gradient averaging would otherwise
        shrink a batch-summed loss); `reported_sum` is the batch SUM of the per-datapoint loss shown to the user
        and written as `train_loss` (detached; for a VAE, minus the bound)."""
        raise NotImplementedError

    def networks(self, model: nn.Module) -> Iterable[tuple[str, nn.Module]]:
        """The (name, module) pairs that autocast, channels_last and profiler ranges wrap (the networks, not the
        probabilistic core, which stays fp32)."""
        return ()

    def prepare(self, model: nn.Module, opts: StepOptions) -> None:
        """Model switches that follow the resolved step options (e.g. per-pair decoders), applied before
        compiling."""

    def compile_fullgraph(self, cfg: TrainConfig) -> bool:
        """Whether the objective traces to one graph under torch.compile (False: graph breaks are allowed)."""
        return True

    def describe(self, cfg: TrainConfig, data_info: dict) -> str:
        """One line for the start banner: what is trained on what."""
        return f"{cfg.model.kind} on {data_info['name']}"

    def metrics_fields(self, cfg: TrainConfig) -> dict:
        """Constant columns of every metrics row (e.g. the network width)."""
        return {}

    def evaluate(self, model: nn.Module, cfg: TrainConfig, splits: dict[str, SplitData],
                 device: torch.device, progress: ProgressFn | None = None) -> dict:
        """Columns added to the metrics row at evaluation epochs (the loop calls it on rank 0, model in train
        mode; return it in train mode). `progress`, when given, is called with (units done, total units) as the
        evaluation goes (e.g. batches), so the loop can show a bar with an ETA."""
        return {}

    def save_outputs(self, model: nn.Module, cfg: TrainConfig, splits: dict[str, SplitData], out: Path,
                     device: torch.device) -> list[str]:
        """Files written into the run folder when training ends (rank 0); returns their names."""
        return []
