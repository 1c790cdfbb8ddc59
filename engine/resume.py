"""Checkpoints of a running training loop, exact resume, and the protection of run folders.

Files in the run folder: `ckpt-{step:08d}.pt` (the newest `keep` are kept) and `checkpoint.pt`, the latest (a hard
link to the newest ckpt file; a copy where links are not possible), which prune, eval and generate read. The
payload is engine/checkpoint.py's (`model`, `optimizer`, `config`, `state`) plus what an exact resume needs:
`rng` (torch CPU and CUDA generator states, per rank), `recipe` (the recipe's state_dict), `scaler` (fp16) and
`run` (JSON: the data set it trained on and the fused-op backend it resolved to). `state` holds the loop position:
completed epochs, batches done in the current epoch, step, the loss accumulated so far in the epoch, and how many
metrics rows belong to the run up to this point.

Publishing a checkpoint is crash-safe at every instruction (`write`): the payload goes to a temporary file that
is synced and renamed to `ckpt-N.pt`; only then is `checkpoint.pt` re-pointed (link + rename) and only after that
are older ckpt files removed. A kill at any point leaves the previous checkpoint intact and at worst a temporary
file; `--resume` takes the newest ckpt file that loads (`find_latest`), re-points `checkpoint.pt` at it and
removes the temporaries of a killed writer (`clean_stale`). `_FAULT` is the fault-injection hook the tests kill
the writer with, at each point of FAULT_POINTS.
"""

from __future__ import annotations

import errno
import io
import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from cmvae_engine.cmvae.checks import ConfigError, Rule, check_value
from cmvae_engine.engine.checkpoint import (
    NotACheckpointError,
    atomic_write_bytes,
    atomic_write_text,
    load_checkpoint,
    unwrap,
)

LATEST = "checkpoint.pt"
METRICS = "metrics.jsonl"
CONFIG = "config.json"
_CKPT = re.compile(r"^ckpt-(\d{8,})\.pt$")
RUN_OUTPUTS = (LATEST, METRICS, CONFIG, "steps.jsonl", "run_info.json", "recon.png", "samples.png", "clusters.json",
               "pruned.pt", "prune.json", "prune.png", "eval.json", "report.html")
"""Files of a run that `--overwrite` removes (with every ckpt-*.pt); a command that writes a new file into the run
folder adds its name here, so that a replaced run leaves nothing of the old one behind."""
RUN_OUTPUT_DIRS = ("generated", "tensorboard", "wandb")
"""Folders the engine writes into a run folder (generate's grids, the logging sinks); `--overwrite` removes them."""
_RUN_MARKERS = (LATEST, METRICS, "pruned.pt")
"""What makes a folder hold a run (besides ckpt-*.pt files): training there without --resume would lose it."""

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)

FAULT_POINTS = ("tmp-open", "tmp-half", "tmp-written", "ckpt-renamed", "link-made", "latest-renamed", "old-removed")
"""Where `write` calls `_FAULT`: before the temporary file is opened, with half the payload written, with all of it
synced, after the rename to ckpt-N.pt, with the link to it made, after checkpoint.pt is replaced, after each older
ckpt file is removed."""
_FAULT: Callable[[str], None] | None = None


def _fault(point: str) -> None:
    if _FAULT is not None:
        _FAULT(point)


# Config fields a resumed run must share with the run it continues (anything else may change: epochs,
# max_steps, the speed options of the step, logging, evaluation and checkpoint cadence, the loader).
_FIXED = ("model", "objective", "n_samples", "beta", "seed", "recipe", "fast", "optim.lr", "optim.amsgrad",
          "optim.batch_size")
_DATA_DECIDED = ("model.n_modalities", "model.image_channels", "model.modalities")
"""Set from the data (adapt_config): compared through the data set itself."""


class RunFolderError(ValueError):
    """--out cannot be used as asked (a file, a run that would be lost, no run to resume, not writable)."""


class DiskFullError(RuntimeError):
    """A write into the run folder failed for lack of space; the message says what was kept."""


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
        """From a checkpoint's state; a field of the wrong type or range is a ConfigError."""
        if not isinstance(d, dict):
            raise ConfigError(f"the loop state must be a JSON object, got {type(d).__name__}")
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        for name in ("epoch", "batch_in_epoch", "step", "epoch_n", "metrics_rows"):
            if name in known:
                check_value(known[name], Rule(int, low=0), f"state.{name}")
        if "epoch_loss" in known:
            check_value(known["epoch_loss"], Rule(float), "state.epoch_loss")
        if not isinstance(known.get("metrics", {}), dict):
            raise ConfigError("state.metrics must be a JSON object")
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


# ----- the folder's checkpoints -----------------------------------------------------------------------------
def ckpt_files(out: Path) -> list[tuple[int, Path]]:
    """(step, path) of every ckpt-*.pt in out, oldest first (by step, not by name: names widen past 1e8)."""
    if not out.is_dir():
        return []
    found = ((_CKPT.match(p.name), p) for p in out.iterdir())
    return sorted((int(m.group(1)), p) for m, p in found if m and p.is_file())


def _fsync_dir(folder: Path) -> None:
    """Make renames in folder durable (a power cut after them must not bring the old names back)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # not possible on this platform/file system: renames are still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _point_latest(out: Path, target: Path) -> None:
    """checkpoint.pt -> target, atomically: a hard link renamed over it (a copy where links are impossible)."""
    link = out / f".{LATEST}.{os.getpid()}.link"
    try:
        link.unlink(missing_ok=True)
        os.link(target, link)
    except OSError as e:
        if e.errno in DISK_FULL:
            raise
        atomic_write_bytes(out / LATEST, target.read_bytes())  # no hard links on this file system: a second copy
    else:
        _fault("link-made")
        os.replace(link, out / LATEST)
    _fsync_dir(out)
    _fault("latest-renamed")


def write(out: Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer, config: dict, state: LoopState,
          rng: list[dict], recipe_state: dict, scaler_state: dict | None, keep: int, run_info: dict | None = None
          ) -> Path:
    """Write ckpt-{step}.pt, point checkpoint.pt at it, then drop all but the newest `keep` ckpt files.

    A full disk raises DiskFullError (the previous checkpoints are untouched)."""
    payload = {
        "model": unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "config": json.dumps(config),
        "state": json.dumps(state.to_dict()),
        "rng": rng,
        "recipe": recipe_state,
        "scaler": scaler_state,
        "run": json.dumps(run_info or {}),
    }
    data = _serialise(payload)
    path = out / f"ckpt-{state.step:08d}.pt"
    tmp = out / f".{path.name}.{os.getpid()}.tmp"
    try:
        _fault("tmp-open")
        with open(tmp, "wb") as f:  # plain open: the umask's permissions, as any other file of the run
            half = len(data) // 2
            f.write(data[:half])
            f.flush()
            _fault("tmp-half")
            f.write(data[half:])
            f.flush()
            os.fsync(f.fileno())
        _fault("tmp-written")
        os.replace(tmp, path)
        _fsync_dir(out)
        _fault("ckpt-renamed")
        _point_latest(out, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.errno in DISK_FULL:
            raise disk_full_error(out, e, path.name, len(data)) from None
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    for _, old in ckpt_files(out)[:-keep]:
        old.unlink(missing_ok=True)
        _fault("old-removed")
    return path


def disk_full_error(out: Path, err: OSError, writing: str, need_bytes: int | None) -> DiskFullError:
    """One message: what failed, what was kept, roughly how much space is needed, how to continue."""
    kept = ckpt_files(out)
    need = f", about {need_bytes / 1e6:,.0f} MB needed" if need_bytes else ""
    if kept:
        step, path = kept[-1]
        have = f"the last good checkpoint is kept: {path} (step {step})"
        then = "continue with the same command and --resume"
    else:
        have = "no checkpoint of this run had been written yet"
        then = "run the same command again"
    return DiskFullError(f"no space left on the device of {out} while writing {writing} ({err.strerror or err}"
                         f"{need}); {have}. Fix: free space there (or pass an --out on a larger disk) and {then}")


def clean_stale(out: Path) -> list[str]:
    """Remove the temporary files that a killed writer left in out (`.ckpt-*.tmp`, `.checkpoint.pt.*.link`, and
    the atomic writes' `.NAME.*.tmp` of our run files); a live process's own are left alone."""
    ours = ("ckpt-", *RUN_OUTPUTS)
    removed = []
    for p in out.iterdir() if out.is_dir() else ():
        name = p.name
        if not (name.startswith(".") and name.endswith((".tmp", ".link")) and name[1:].startswith(ours)):
            continue
        pid = name.rsplit(".", 2)[-2]
        if pid.isdigit() and int(pid) != os.getpid() and _alive(int(pid)):
            continue
        p.unlink(missing_ok=True)
        removed.append(name)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True


# ----- run-folder protection --------------------------------------------------------------------------------
def run_files(out: Path) -> list[str]:
    """The files that make out hold a run (empty: no run there)."""
    if not out.is_dir():
        return []
    return [p.name for _, p in ckpt_files(out)] + [n for n in _RUN_MARKERS if (out / n).is_file()]


def check_out_folder(out: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse, before anything is read or written, an --out that is a file, one whose run training would replace
    (without --resume or --overwrite), a --resume without a checkpoint, or a folder that cannot be written."""
    if out.exists() and not out.is_dir():
        raise RunFolderError(f"--out {out} is a file, not a folder. Fix: pass a folder for the run with --out (a new "
                             "name is created)")
    ancestor = out
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
        raise RunFolderError(f"--out {out}: cannot write in {ancestor} (permission denied or not a folder). Fix: pass "
                             "an --out where you can write")
    files = run_files(out)
    if resume:
        if not ckpt_files(out) and not (out / LATEST).is_file():
            raise RunFolderError(f"--resume: no checkpoint in {out} (no {LATEST}, no ckpt-*.pt). Fix: train into "
                                 f"--out {out} first, or drop --resume")
        return
    if files and not overwrite:
        steps = ckpt_files(out)
        at = f" (latest checkpoint at step {steps[-1][0]})" if steps else ""
        listed = ", ".join(files[:4]) + (", ..." if len(files) > 4 else "")
        raise RunFolderError(f"--out {out} already holds a run{at}: {listed}. Training there would replace it, so "
                             "nothing was touched. Fix: continue it with --resume, replace it with --overwrite, or "
                             "pass another --out")


def remove_run(out: Path) -> list[str]:
    """--overwrite: remove the old run's files (called only once the new run's data and settings are checked)."""
    removed = []
    for p in [p for _, p in ckpt_files(out)] + [out / n for n in RUN_OUTPUTS]:
        if p.is_file():
            p.unlink()
            removed.append(p.name)
    for d in (out / n for n in RUN_OUTPUT_DIRS):
        if d.is_dir() and not d.is_symlink():
            shutil.rmtree(d)
            removed.append(f"{d.name}/")
    return removed


# ----- resuming ---------------------------------------------------------------------------------------------
@dataclass
class Latest:
    payload: dict
    path: Path
    """The file it came from."""
    skipped: list[str]
    """Newer files that did not load, with the reason."""


def find_latest(out: Path, device: torch.device | str = "cpu") -> Latest:
    """The newest checkpoint of out that loads: ckpt-*.pt by step, newest first, then checkpoint.pt. A file
    that fails to load is skipped (and reported); none loading is an error naming each file."""
    candidates = [p for _, p in reversed(ckpt_files(out))]
    latest = out / LATEST
    if latest.is_file() and not any(_same(latest, p) for p in candidates):
        candidates.append(latest)
    if not candidates:
        raise RunFolderError(f"--resume: no checkpoint in {out} (no {LATEST}, no ckpt-*.pt). Fix: train into --out "
                             f"{out} first, or drop --resume")
    skipped = []
    for path in candidates:
        try:
            payload = load_checkpoint(path, map_location=device)
            payload["state"] = LoopState.from_dict(payload["state"])
        except (NotACheckpointError, ConfigError) as e:
            skipped.append(f"{path.name}: {e}")
            continue
        return Latest(payload, path, skipped)
    raise RunFolderError(f"--resume: no checkpoint in {out} can be loaded ({'; '.join(skipped)}). Fix: drop --resume "
                         "and train again into another --out (or --overwrite this one)")


def _same(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def repair_latest(out: Path, source: Path) -> bool:
    """Point checkpoint.pt at source when it does not already (a writer killed between its renames)."""
    latest = out / LATEST
    if source == latest or _same(latest, source):
        return False
    _point_latest(out, source)
    return True


def load(out: Path, device: torch.device) -> dict:
    """The newest loadable checkpoint's payload (state as a LoopState), for --resume."""
    return find_latest(out, device).payload


def _get(d: dict, dotted: str):
    for part in dotted.split("."):
        d = d.get(part) if isinstance(d, dict) else None
    return d


def _leaves(value, prefix: str) -> dict:
    if not isinstance(value, dict):
        return {prefix: value}
    return {k: v for key, sub in value.items() for k, v in _leaves(sub, f"{prefix}.{key}").items()}


def check_compatible(saved: dict, new: dict, path: Path) -> None:
    """Refuse to continue a run with a different model, objective, seed or optimiser (naming the flag)."""
    from cmvae_engine.engine.config import flag_of

    for key in _FIXED:
        if key == "fast" and saved.get("recipe") != "fast":
            continue
        a, b = _leaves(_get(saved, key), key), _leaves(_get(new, key), key)
        for name in sorted(set(a) | set(b)):
            if name in _DATA_DECIDED or a.get(name) == b.get(name):
                continue
            flag = flag_of(name)
            what = f"{flag} ({name})" if flag else name
            raise ValueError(f"--resume: {path} was trained with {what} = {a.get(name)!r} but this run asks for "
                             f"{b.get(name)!r}. Fix: pass the run's own value (or leave the flag out: the run's "
                             "settings are used), or drop --resume and train into another --out")


def check_same_data(saved_run: dict, data_info: dict, saved_dataset: str, path: Path) -> str | None:
    """Refuse to continue a run on another data set; a note when the same data set is read from elsewhere."""
    saved = (saved_run or {}).get("data") or {}
    if not saved.get("root"):
        return None  # written before runs recorded their data: nothing to compare
    same_root = os.path.realpath(saved["root"]) == os.path.realpath(data_info["root"])
    if same_root:
        return None
    if saved.get("fingerprint") and saved.get("fingerprint") == data_info.get("fingerprint"):
        return f"the run's data set is read from {data_info['root']} (it trained on {saved['root']}; same content)"
    raise ValueError(f"--resume: {path} was trained on DATASET {saved_dataset!r} ({saved['root']}) but this run asks "
                     f"for {data_info['root']}. Fix: pass the run's DATASET {saved_dataset!r} (or leave it out), or "
                     "drop --resume and train into another --out")


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
