"""Reading back a run folder: its config, its model and its data."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from cmvae_engine.engine.checkpoint import NotACheckpointError, load_checkpoint
from cmvae_engine.engine.config import TrainConfig
from cmvae_engine.engine.tasks import task_for


@dataclass
class LoadedRun:
    run_dir: Path
    config: TrainConfig
    model: nn.Module
    """The trained model (a CMVAE for the cmvae and mmvaeplus kinds), in eval mode."""
    state: dict
    """Loop state saved with the checkpoint (epoch, step, last metrics)."""


def load_run(
    run_dir: str | Path, *, checkpoint: str = "checkpoint.pt", device: str | torch.device = "cpu"
) -> LoadedRun:
    """Rebuild the trained model of a run folder (strict state-dict load, weights_only)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"no run folder at {run_dir}; pass the --out folder of `cmvae-engine train`")
    path = run_dir / checkpoint
    payload = load_checkpoint(path, map_location=device)
    cfg = TrainConfig.from_dict(payload["config"], where=str(path))
    model = task_for(cfg.model.kind).build_model(cfg)
    try:
        model.load_state_dict(payload["model"], strict=True)
    except RuntimeError as e:  # weights of another architecture than the config describes
        first = str(e).strip().splitlines()[0][:300]
        raise NotACheckpointError(f"{path} is not a cmvae-engine checkpoint of the model its config describes: its "
                                  f"weights do not fit ({first}). Fix: pass a checkpoint written by `cmvae-engine "
                                  "train` or `prune` and left unchanged") from None
    model.to(device).eval()
    return LoadedRun(run_dir, cfg, model, payload["state"])
