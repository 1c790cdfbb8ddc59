"""Checkpoints and other run files, always written atomically (temp file in the same folder + os.replace)."""

from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from cmvae_engine.engine.config import TrainConfig

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


class NotACheckpointError(ValueError):
    """A file that is not a checkpoint we write (or one cut short): the message names it and the fix."""


_FIX = ("Fix: pass a checkpoint.pt, ckpt-*.pt or pruned.pt written by `cmvae-engine train` or `prune` (a damaged "
        "file cannot be repaired: use an older ckpt-*.pt of the run, or train again)")


def _not_ours(path: Path, why: str) -> NotACheckpointError:
    return NotACheckpointError(f"{path} is not a cmvae-engine checkpoint ({why}). {_FIX}")


def _json_field(payload: dict, key: str, path: Path) -> dict:
    text = payload[key]
    if not isinstance(text, str):
        raise _not_ours(path, f"its {key!r} is a {type(text).__name__}, not the JSON text we write")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise _not_ours(path, f"its {key!r} is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise _not_ours(path, f"its {key!r} holds a JSON {type(value).__name__}, not an object")
    return value


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint with weights_only=True -> {'model', 'optimizer', 'config' (dict), 'state' (dict), ...}.

    Anything else (a bare tensor or state dict, another program's dict, a truncated file, a config that is not a
    TrainConfig we write) is a NotACheckpointError that names the file and what is wrong with it."""
    path = Path(path)
    if path.is_dir():
        raise NotACheckpointError(f"{path} is a folder, not a checkpoint file. Fix: pass the run folder's "
                                  "checkpoint.pt (or the run folder where a command takes RUN_DIR)")
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}; train a model first (`cmvae-engine train ...`)")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # a truncated or foreign file: say which and what to do
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise _not_ours(path, f"it cannot be read: {first[:300]}") from None
    if not isinstance(payload, dict):
        raise _not_ours(path, f"it holds a {type(payload).__name__}, not the dict of model, config and state we "
                              "write")
    missing = [k for k in ("model", "config", "state") if k not in payload]
    if missing:
        kind = "a bare state_dict" if payload and all(isinstance(v, torch.Tensor) for v in payload.values()) else \
            "a dict of other fields"
        raise _not_ours(path, f"{kind}, without the field{'s' if len(missing) > 1 else ''} "
                              f"{', '.join(map(repr, missing))}")
    model = payload["model"]
    if not isinstance(model, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in model.items()):
        raise _not_ours(path, "its 'model' is not a state dict of tensors")
    payload["config"] = _json_field(payload, "config", path)
    payload["state"] = _json_field(payload, "state", path)
    payload["run"] = _json_field(payload, "run", path) if "run" in payload else {}
    try:
        TrainConfig.from_dict(payload["config"], where="its config")
    except ValueError as e:
        raise _not_ours(path, str(e)) from None
    return payload
