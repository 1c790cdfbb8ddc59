"""Checkpoints of a running training loop and exact resume.

Files in the run folder: `ckpt-{step:08d}.pt` (the newest `keep` are kept) and `checkpoint.pt`, always the latest
(a hard link to the newest ckpt file; a copy where links are not possible). Each is written atomically. The
payload is engine/checkpoint.py's (`model`, `optimizer`, `config`, `state`) plus what an exact resume needs:
`rng` (torch CPU and CUDA generator states, per rank), `recipe` (the recipe's state_dict) and `scaler` (fp16).
`state` holds the loop position: completed epochs, batches done in the current epoch, step, the loss
accumulated so far in the epoch, and how many metrics rows belong to the run up to this point.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from cmvae_engine.engine.checkpoint import atomic_write_bytes, atomic_write_text, load_checkpoint, unwrap

LATEST = "checkpoint.pt"
METRICS = "metrics.jsonl"

# Config fields a resumed run must share with the run it continues (anything else may change: epochs,
# max_steps, the speed options of the step, logging, evaluation and checkpoint cadence, the loader).
_FIXED = ("model", "objective", "n_samples", "beta", "seed", "recipe", "fast", "optim.lr", "optim.amsgrad",
          "optim.batch_size")


@dataclass
class LoopState:
    epoch: int = 0
    """Completed epochs (the epoch in progress has this 0-based index)."""
    batch_in_epoch: int = 0
    """Batches of the epoch in progress already trained on."""
    step: int = 0
    """Optimiser steps done."""
    epoch_loss: float = 0.0
    """Summed loss (minus the bound) of the epoch in progress, over all ranks."""
    epoch_n: int = 0
    """Tuples behind epoch_loss."""
    metrics_rows: int = 0
    """Rows of metrics.jsonl written for completed epochs."""
    metrics: dict = field(default_factory=dict)
    """The last metrics row."""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> LoopState:
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        return cls(**known)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _serialise(payload: dict) -> bytes:
    buf = io.BytesIO()
    torch.save(payload, buf)
    return buf.getvalue()


def write(out: Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer, config: dict, state: LoopState,
          rng: list[dict], recipe_state: dict, scaler_state: dict | None, keep: int) -> Path:
    """Write ckpt-{step}.pt and point checkpoint.pt at it; drop all but the newest `keep` ckpt files."""
    payload = {
        "model": unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "config": json.dumps(config),
        "state": json.dumps(state.to_dict()),
        "rng": rng,
        "recipe": recipe_state,
        "scaler": scaler_state,
    }
    data = _serialise(payload)
    path = out / f"ckpt-{state.step:08d}.pt"
    atomic_write_bytes(path, data)
    latest = out / LATEST
    tmp = out / f".{LATEST}.{os.getpid()}.link"
    try:
        tmp.unlink(missing_ok=True)
        os.link(path, tmp)
        os.replace(tmp, latest)
    except OSError:  # no hard links on this file system: a second copy
        tmp.unlink(missing_ok=True)
        atomic_write_bytes(latest, data)
    for old in sorted(out.glob("ckpt-*.pt"))[:-keep]:
        old.unlink(missing_ok=True)
    return path


def clear(out: Path) -> None:
    """A fresh run into an existing folder: its old checkpoints and metrics belong to the run it replaces."""
    for p in [*out.glob("ckpt-*.pt"), out / LATEST, out / METRICS]:
        p.unlink(missing_ok=True)


def _get(d: dict, dotted: str):
    for part in dotted.split("."):
        d = d.get(part) if isinstance(d, dict) else None
    return d


def _leaves(value, prefix: str) -> dict:
    if not isinstance(value, dict):
        return {prefix: value}
    return {k: v for key, sub in value.items() for k, v in _leaves(sub, f"{prefix}.{key}").items()}


def check_compatible(saved: dict, new: dict, path: Path) -> None:
    """Refuse to continue a run with a different model, objective, seed or optimiser."""
    for key in _FIXED:
        if key == "fast" and saved.get("recipe") != "fast":
            continue
        a, b = _leaves(_get(saved, key), key), _leaves(_get(new, key), key)
        for name in sorted(set(a) | set(b)):
            if name != "model.n_modalities" and a.get(name) != b.get(name):  # M comes from the data in both
                raise ValueError(f"--resume: {path} was trained with {name}={a.get(name)!r} but this run asks for "
                                 f"{b.get(name)!r}; pass the run's own settings (or drop --resume and use another "
                                 "--out)")


def load(out: Path, device: torch.device) -> dict:
    """The latest checkpoint of a run folder, for --resume (clear error when there is none)."""
    path = out / LATEST
    if not path.is_file():
        raise FileNotFoundError(f"--resume: no checkpoint at {path}; train into --out {out} first, or drop --resume")
    payload = load_checkpoint(path, map_location=device)
    payload["state"] = LoopState.from_dict(payload["state"])
    return payload


def truncate_metrics(out: Path, rows: int) -> None:
    """Keep the first `rows` lines of metrics.jsonl: later rows describe work the resumed run redoes."""
    path = out / METRICS
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    if len(lines) != rows:
        atomic_write_text(path, "".join(lines[:rows]))


def append_metrics(out: Path, row: dict) -> None:
    """Append one row (appending keeps the rows of earlier, resumed-from runs)."""
    with (out / METRICS).open("a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())
