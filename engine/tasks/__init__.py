"""Model families the training loop can train, by `model.kind` (engine/tasks/base.py describes the seam).

A family registers here with the module and class of its Task; modules are imported on first use, so a family's
dependencies load only when it trains.
"""

from __future__ import annotations

import importlib

from cmvae_engine.engine.tasks.base import Task

TASKS: dict[str, str] = {
    "cmvae": "cmvae_engine.engine.tasks.cmvae_task:CMVAETask",
    "mmvaeplus": "cmvae_engine.engine.tasks.cmvae_task:CMVAETask",
    "mfcvae": "cmvae_engine.engine.tasks.mfcvae_task:MFCVAETask",
    "dcmvae": "cmvae_engine.engine.tasks.diffusion_task:DiffusionTask",
}


def task_for(kind: str) -> Task:
    """The Task that trains models of this kind."""
    if kind not in TASKS:
        raise ValueError(f"no training task for model kind {kind!r}; known kinds: {', '.join(TASKS)}")
    module, _, name = TASKS[kind].partition(":")
    return getattr(importlib.import_module(module), name)()


__all__ = ["TASKS", "Task", "task_for"]
