"""Progress callbacks for long computations of the model floor.

A function that takes a while accepts `progress: ProgressFn | None` and calls it with (units done, total units)
as it goes; the engine and the command line render it (engine/progress.py). This floor never draws anything.
"""

from __future__ import annotations

from collections.abc import Callable

ProgressFn = Callable[[int, int], None]
"""Called with (units of work done so far, total units of work)."""


def report(progress: ProgressFn | None, done: int, total: int) -> None:
    if progress is not None:
        progress(done, total)


def shifted(progress: ProgressFn | None, start: int, total: int) -> ProgressFn | None:
    """A callback for one stage of a longer job: the stage's (done, stage total) become (start + done, total)."""
    if progress is None:
        return None
    return lambda done, _stage_total: progress(start + done, total)


def batches(n: int, batch_size: int) -> int:
    """Number of batches of `batch_size` that cover n items."""
    return -(-n // batch_size) if n > 0 else 0
