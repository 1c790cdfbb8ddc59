"""Graceful stops: SIGINT/SIGTERM set a flag that the training loop reads between steps; it then writes a
checkpoint and returns. A second SIGINT (more than REPEAT_S later) interrupts at once (KeyboardInterrupt)."""

from __future__ import annotations

import signal
import threading
import time
from types import FrameType


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
