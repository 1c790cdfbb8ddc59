"""What a user sees while the engine works: one rich Progress per command, one bar per phase with an ETA, the
epoch summary line and the projected cost of a long run.

Commands create a `Board` and open a `phase` for every piece of work that may take more than a few seconds; the
phase's handle is a `ProgressFn` (cmvae/progress.py), so it can be handed to the model floor's long functions.
A finished phase's bar disappears and leaves one line with its time, so the screen keeps a log of what ran.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


def progress_columns() -> tuple:
    """Description, bar, done/total, elapsed, time remaining (the ETA), then a free text field `stats`."""
    return (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[stats]}"))


class Phase:
    """A bar of a Board: call it with (done, total), or `advance(n)`; `note(text)` sets its stats text. A lazy
    phase shows its bar only once it is first called (work that may turn out not to be needed)."""

    def __init__(self, board: Board | None, description: str = "", total: int | None = None, completed: int = 0,
                 lazy: bool = False):
        self._board, self._description, self._task = board, description, None
        self.done, self.total = completed, total
        if board is not None and not lazy:
            self._show()

    def _show(self) -> None:
        if self._task is None and self._board is not None:
            self._task = self._board.add_task(self._description, total=self.total, completed=self.done, stats="")

    def __call__(self, done: int, total: int) -> None:
        self.done, self.total = done, max(total, 1)
        self._show()
        if self._task is not None:
            self._board.progress.update(self._task, completed=done, total=self.total)

    def advance(self, n: int = 1) -> None:
        self.done += n
        self._show()
        if self._task is not None:
            self._board.progress.update(self._task, completed=self.done)

    def note(self, text: str) -> None:
        self._show()
        if self._task is not None:
            self._board.progress.update(self._task, stats=text)

    def close(self) -> None:
        if self._task is not None:
            self._board.progress.remove_task(self._task)
            self._task = None


class Board:
    """One live Progress for a command; `phase()` opens a bar, the `with` block of the Board shows them."""

    def __init__(self, console: Console, disable: bool = False):
        self.console = console
        self.progress = Progress(*progress_columns(), console=console, disable=disable)
        self._open = self._live = False

    def __enter__(self) -> Board:
        self._open = True
        return self

    def __exit__(self, *exc) -> None:
        self._open = False
        if self._live:
            self.progress.stop()
            self._live = False

    def add_task(self, description: str, **kw):
        """The live display starts with its first bar (a board that shows nothing leaves no trace)."""
        if self._open and not self._live:
            self.progress.start()
            self._live = True
        return self.progress.add_task(description, **kw)

    def bar(self, description: str, total: int, completed: int = 0) -> Phase:
        """A bar that stays (the training steps); `phase` is for bars that end."""
        return Phase(self, description, max(total, 1), completed)

    @contextlib.contextmanager
    def phase(self, description: str, total: int | None = None, done_line: bool = True,
              lazy: bool = False) -> Iterator[Phase]:
        """A bar for one piece of work; when it ends it is replaced by `description: done in 12.3s` (not for a
        lazy phase that was never called)."""
        bar = Phase(self, description, total, lazy=lazy)
        t0 = time.perf_counter()
        try:
            yield bar
        finally:
            shown = bar._task is not None
            bar.close()
        if done_line and shown:
            self.console.print(f"{description}: done in {format_duration(time.perf_counter() - t0)}",
                               markup=False, highlight=False)


@contextlib.contextmanager
def phase(board: Board | None, description: str, total: int | None = None, **kw) -> Iterator[Phase]:
    """board.phase(...), or a phase that shows nothing when there is no board."""
    if board is None:
        yield Phase(None)
    else:
        with board.phase(description, total, **kw) as bar:
            yield bar


# ----- numbers a person reads ---------------------------------------------------------------------------------
def format_duration(seconds: float) -> str:
    """1.2s, 45s, 6m12s, 3h05m, 2d04h."""
    if not math.isfinite(seconds):
        return "?"
    if seconds < 10:
        return f"{seconds:.1f}s"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    return f"{s // 86400}d{(s % 86400) // 3600:02d}h"


def format_number(v: float) -> str:
    """Rounded for a summary line: 9,512.3 / -9,480.1 / 12.35 / 0.953."""
    if isinstance(v, bool) or not isinstance(v, int | float):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if not math.isfinite(v):
        return str(v)
    if abs(v) >= 100:
        return f"{v:,.1f}"
    if abs(v) >= 1:
        return f"{v:.2f}"
    return f"{v:.3f}"


METRIC_LABELS = {"train_loss": "loss", "test_bound": "test bound", "test_nmi": "NMI", "test_ari": "ARI",
                 "test_acc": "ACC", "test_n_clusters": "clusters"}
"""How the epoch line names the metrics columns it knows; others are shown with their key."""
_LOOP_KEYS = ("epoch", "step", "elapsed_s", "samples_per_s")


def epoch_line(row: dict, epochs: int, skip: tuple[str, ...] = ()) -> str:
    """One readable line for a metrics row, e.g.
    `epoch 3/250  step 711  loss 9,512.3  test bound -9,480.1  NMI 0.953  ARI 0.940  ACC 0.970  212 samples/s  6m12s`.
    `skip`: columns not to show (constant ones such as the width)."""
    parts = [f"epoch {row.get('epoch')}/{epochs}", f"step {row.get('step', 0):,}"]
    for key, value in row.items():
        if key in _LOOP_KEYS or key in skip:
            continue
        parts.append(f"{METRIC_LABELS.get(key, key.replace('_', ' '))} {format_number(value)}")
    if "samples_per_s" in row:
        parts.append(f"{row['samples_per_s']:,.0f} samples/s")
    if "elapsed_s" in row:
        parts.append(format_duration(row["elapsed_s"]))
    return "  ".join(parts)
