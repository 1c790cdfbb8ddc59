"""Where a result came from: the command line, versions, the code's commit, the machine and the time.

`train` appends one entry per session (a fresh start or a resume) to `RUN/run_info.json`; `eval`, `prune` and
`generate` put the same record under `run_info` in their own JSON. The report shows them.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

import torch

RUN_INFO = "run_info.json"
_REPO = Path(__file__).resolve().parent.parent


def git_state(repo: Path = _REPO) -> tuple[str | None, bool | None]:
    """(HEAD of the checkout the code runs from, whether tracked files have uncommitted changes); (None, None)
    outside git."""
    try:
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None, None
    return (head, bool(dirty)) if head else (None, None)


def git_commit(repo: Path = _REPO) -> str | None:
    """HEAD, with `+dirty` when tracked files have uncommitted changes; None outside git."""
    head, dirty = git_state(repo)
    return head + ("+dirty" if dirty else "") if head else None


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device | str | None) -> str:
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(dev)
    return f"{cpu_name()} ({os.cpu_count()} logical cores, {torch.get_num_threads()} torch threads)"


def run_info(device: torch.device | str | None = None, argv: list[str] | None = None) -> dict:
    """The record for a command that is starting now."""
    argv = list(sys.argv if argv is None else argv)
    if argv and argv[0].endswith(("cmvae-engine", "__main__.py")):
        argv[0] = "cmvae-engine"
    return {
        "command": shlex.join(argv),
        "cwd": os.getcwd(),
        "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device) if device is not None else None,
        "device_name": device_name(device),
    }


def record_training_start(out: Path, device: torch.device, resumed: bool) -> None:
    """Append this session to RUN/run_info.json (a fresh run starts the list afresh)."""
    from cmvae_engine.engine.checkpoint import atomic_write_json

    path = Path(out) / RUN_INFO
    sessions: list = []
    if resumed:
        try:
            sessions = list(json.loads(path.read_text()).get("sessions", []))
        except (OSError, ValueError, AttributeError):
            sessions = []
    sessions.append({**run_info(device), "resumed": resumed})
    atomic_write_json(path, {"sessions": sessions})
