"""Checkpoints and other run files, always written atomically (temp file in the same folder + os.replace)."""

from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write data to path so that a reader sees either the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp creates 0600; give the file the permissions a plain open() would.
        os.chmod(tmp, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The plain module under torch.compile / DDP wrappers, so state_dict keys carry no prefixes."""
    while True:
        inner = getattr(module, "_orig_mod", None) or getattr(module, "module", None)
        if inner is None:
            return module
        module = inner


def save_checkpoint(path: str | Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                    config: dict, state: dict) -> None:
    """model/optimiser state dicts plus the run config and loop state (JSON-able) in one atomic file."""
    payload = {
        "model": unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        # Stored as JSON text: weights_only loading accepts strings, and the config stays readable.
        "config": json.dumps(config),
        "state": json.dumps(state),
    }
    buf = io.BytesIO()
    torch.save(payload, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint with weights_only=True -> {'model', 'optimizer', 'config' (dict), 'state' (dict)}."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}; train a model first (`cmvae-engine train ...`)")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # a truncated or foreign file: say which and what to do
        raise ValueError(f"{path} is not a readable cmvae-engine checkpoint ({e}); re-run training or "
                         "point to another checkpoint") from e
    for key in ("model", "config", "state"):
        if key not in payload:
            raise ValueError(f"{path} lacks the field {key!r}: it is not a cmvae-engine checkpoint")
    payload["config"] = json.loads(payload["config"])
    payload["state"] = json.loads(payload["state"])
    return payload
