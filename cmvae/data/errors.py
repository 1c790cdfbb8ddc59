"""The one exception type for bad data on disk or bad data arguments."""

from __future__ import annotations

from pathlib import Path


class DataError(ValueError):
    """A data problem a person can fix: the message names the file, the problem and the fix.

    Built from parts so that every message has the same shape ("FILE: problem. Fix: ...") and callers
    (the CLI) can still reach the parts. Constructing it from a single string also works, which keeps
    the exception picklable across worker processes.
    """

    def __init__(self, problem: str, *, path: str | Path | None = None, fix: str | None = None) -> None:
        self.problem = problem
        self.path = None if path is None else Path(path)
        self.fix = fix
        super().__init__(self._compose())

    def _compose(self) -> str:
        text = self.problem if self.path is None else f"{self.path}: {self.problem}"
        if self.fix:
            text = f"{text.rstrip('.')}. Fix: {self.fix}"
        return text
