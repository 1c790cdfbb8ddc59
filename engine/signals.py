"""Graceful stops: SIGINT/SIGTERM set a flag that the training loop reads between steps; it then writes a
checkpoint and raises `Stopped`. A second SIGINT (more than REPEAT_S later) interrupts at once (KeyboardInterrupt).

Exit codes of `cmvae-engine train` (README, "Exit codes"): 0 done; 2 refused before training (bad input, a run
folder that would be lost, an incompatible --resume); 1 training failed (non-finite loss, full disk, a worker
failure); 128 + the signal's number (130 SIGINT, 143 SIGTERM) stopped by that signal with a checkpoint written,
resumable with --resume. The last is what a shell reports for a process killed by the signal, so batch schedulers
(Slurm, Kubernetes) treat the job as interrupted, not finished, and may requeue it."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path
from types import FrameType

EXIT_DONE = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2


def exit_code_for(signum: int) -> int:
    """128 + signal number: 130 for SIGINT, 143 for SIGTERM."""
    return 128 + int(signum)


class Stopped(Exception):  # noqa: N818 (a stop asked for, not an error)
    """Training stopped by a signal after writing a checkpoint; `--resume` continues it."""

    def __init__(self, signum: int, step: int, checkpoint: Path | None, metrics: dict | None = None):
        self.signum, self.step, self.checkpoint, self.metrics = signum, step, checkpoint, metrics or {}
        name = signal.Signals(signum).name
        where = "before step 1" if step == 0 else f"at step {step}"
        super().__init__(f"stopped by {name} {where}; checkpoint {checkpoint}. Continue with the same command and "
                         "--resume")

    @property
    def exit_code(self) -> int:
        return exit_code_for(self.signum)


class StopFlag:
    """Context manager installing the handlers (main thread only; elsewhere it only holds the flag)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)
    REPEAT_S = 2.0
    """A SIGINT this soon after the first is the same Ctrl-C arriving again (torchrun forwards the signal its
    process group already delivered), not a second request."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._at = 0.0
        self._previous: dict[int, object] = {}

    @property
    def name(self) -> str | None:
        return signal.Signals(self.signum).name if self.signum is not None else None

    def __bool__(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        del frame
        now = time.monotonic()
        if self.signum == signal.SIGINT and signum == signal.SIGINT and now - self._at > self.REPEAT_S:
            raise KeyboardInterrupt  # a second Ctrl-C: the user does not want to wait for the checkpoint
        if self.signum is None:
            self.signum, self._at = signum, now

    def __enter__(self) -> StopFlag:
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()
