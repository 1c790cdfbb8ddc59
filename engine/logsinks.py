"""Where the training loop's numbers go besides the screen and metrics.jsonl.

The loop hands every sink the same three things, at moments when it has already read them on the host (no extra
device syncs): `step` (the loss and rates at each log interval, the recipe's step scalars, the learning rates),
`epoch` (each metrics row) and `event` (what the recipe reports: warm-start losses, prior fits, checks).

- `RUN/steps.jsonl` always (one JSON object per line, `kind` = step | epoch | event);
- `--log tensorboard`: event files in `RUN/tensorboard/` (torch.utils.tensorboard; `pip install tensorboard`);
- `--log wandb`: a Weights & Biases run in `RUN/wandb/` (`pip install wandb`); WANDB_MODE=offline keeps it on
  disk (`wandb sync` uploads it later), and WANDB_PROJECT names the project (default cmvae-engine).
"""

from __future__ import annotations

import json
import math
import os
import secrets
from pathlib import Path
from typing import Any

STEPS = "steps.jsonl"
SINKS = ("tensorboard", "wandb")
"""Optional sinks, by their --log names."""


def parse_sinks(text: str | list[str] | tuple[str, ...] | None) -> list[str]:
    """'tensorboard,wandb' -> ['tensorboard', 'wandb']; refuses unknown names."""
    if not text:
        return []
    names = [n.strip() for n in (text.split(",") if isinstance(text, str) else text)]
    names = [n for n in names if n and n != "none"]
    bad = [n for n in names if n not in SINKS]
    if bad:
        raise ValueError(f"--log: unknown sink {', '.join(map(repr, bad))}; choose from {', '.join(SINKS)} "
                         "(comma-separated; metrics.jsonl and steps.jsonl are always written)")
    return list(dict.fromkeys(names))


def _numbers(values: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The finite numbers of a (nested) dict as flat `a/b` keys; tuples and lists become `key/0`, `key/1`, ..."""
    out: dict[str, float] = {}
    for key, v in values.items():
        name = f"{prefix}{key}"
        if isinstance(v, bool):
            continue
        if isinstance(v, int | float):
            if math.isfinite(v):
                out[name] = float(v)
        elif isinstance(v, dict):
            out.update(_numbers(v, name + "/"))
        elif isinstance(v, list | tuple) and all(isinstance(x, int | float) and not isinstance(x, bool) for x in v):
            out.update({f"{name}/{i}": float(x) for i, x in enumerate(v) if math.isfinite(x)})
    return out


class Sink:
    """The interface; every method may be a no-op."""

    def step(self, step: int, values: dict[str, Any]) -> None: ...

    def epoch(self, step: int, row: dict[str, Any]) -> None: ...

    def event(self, step: int, event: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


class JsonlSink(Sink):
    """RUN/steps.jsonl. A fresh run starts it empty; a resumed run keeps the lines up to its checkpoint's step
    (later ones are redone) and appends."""

    def __init__(self, out: Path, resume_step: int | None):
        self.path = Path(out) / STEPS
        kept: list[str] = []
        if resume_step is not None and self.path.is_file():
            for line in self.path.read_text().splitlines():
                try:
                    if json.loads(line).get("step", 0) <= resume_step:
                        kept.append(line)
                except ValueError:
                    continue  # a line cut by a kill
        from cmvae_engine.engine.checkpoint import atomic_write_text

        atomic_write_text(self.path, "".join(f"{line}\n" for line in kept))
        self._file = self.path.open("a")

    def _write(self, record: dict) -> None:
        self._file.write(json.dumps(record, default=str) + "\n")
        self._file.flush()

    def step(self, step: int, values: dict[str, Any]) -> None:
        self._write({"kind": "step", "step": step, **values})

    def epoch(self, step: int, row: dict[str, Any]) -> None:
        self._write({"kind": "epoch", **row, "step": step})

    def event(self, step: int, event: dict[str, Any]) -> None:
        self._write({"kind": "event", **event, "step": step})

    def close(self) -> None:
        self._file.close()


class TensorBoardSink(Sink):
    """Scalars under train/ (step values), eval/ (epoch rows) and events/<name>/ (recipe events)."""

    def __init__(self, out: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:  # torch raises ImportError when the tensorboard package is missing
            raise ModuleNotFoundError(f"--log tensorboard needs the tensorboard package (pip install "
                                      f"'cmvae-engine[tensorboard]'): {e}") from None
        self.writer = SummaryWriter(log_dir=str(Path(out) / "tensorboard"))

    def step(self, step: int, values: dict[str, Any]) -> None:
        for k, v in _numbers(values).items():
            self.writer.add_scalar(f"train/{k}", v, step)

    def epoch(self, step: int, row: dict[str, Any]) -> None:
        for k, v in _numbers(row).items():
            self.writer.add_scalar(f"eval/{k}", v, step)

    def event(self, step: int, event: dict[str, Any]) -> None:
        name = str(event.get("event", "event"))
        values = {k: v for k, v in event.items() if k not in ("event", "step")}
        for k, v in _numbers(values).items():
            self.writer.add_scalar(f"events/{name}/{k}", v, step)

    def close(self) -> None:
        self.writer.close()


class WandbSink(Sink):
    """One W&B run per training session (a resumed session resumes the same run id, stored in RUN/wandb/id)."""

    def __init__(self, out: Path, config: dict):
        try:
            import wandb
        except ImportError:
            raise ModuleNotFoundError("--log wandb needs the wandb package (pip install 'cmvae-engine[wandb]')"
                                      ) from None
        out = Path(out)
        folder = out / "wandb"
        folder.mkdir(parents=True, exist_ok=True)
        id_file = folder / "id"
        run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)
        id_file.write_text(run_id + "\n")
        self.wandb = wandb
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "cmvae-engine"), name=out.name, id=run_id,
                              dir=str(out), config=config, resume="allow", reinit="create_new")

    def step(self, step: int, values: dict[str, Any]) -> None:
        self.run.log({f"train/{k}": v for k, v in _numbers(values).items()}, step=step)

    def epoch(self, step: int, row: dict[str, Any]) -> None:
        self.run.log({f"eval/{k}": v for k, v in _numbers(row).items()}, step=step)

    def event(self, step: int, event: dict[str, Any]) -> None:
        name = str(event.get("event", "event"))
        values = {k: v for k, v in event.items() if k not in ("event", "step")}
        self.run.log({f"events/{name}/{k}": v for k, v in _numbers(values).items()}, step=step)

    def close(self) -> None:
        self.run.finish()


class Sinks(Sink):
    """Every configured sink behind one interface (empty on the ranks that do not write files)."""

    def __init__(self, sinks: list[Sink]):
        self.sinks = sinks

    def step(self, step: int, values: dict[str, Any]) -> None:
        for s in self.sinks:
            s.step(step, values)

    def epoch(self, step: int, row: dict[str, Any]) -> None:
        for s in self.sinks:
            s.epoch(step, row)

    def event(self, step: int, event: dict[str, Any]) -> None:
        for s in self.sinks:
            s.event(step, event)

    def close(self) -> None:
        for s in self.sinks:
            s.close()


def open_sinks(names: str | list[str], out: Path, *, resume_step: int | None, config: dict) -> Sinks:
    """steps.jsonl plus the named optional sinks. Call on the writing rank only."""
    sinks: list[Sink] = [JsonlSink(out, resume_step)]
    for name in parse_sinks(names):
        sinks.append(TensorBoardSink(out) if name == "tensorboard" else WandbSink(out, config))
    return Sinks(sinks)
