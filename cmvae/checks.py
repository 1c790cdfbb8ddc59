"""Validation of settings in one place: every number and choice a command takes or a file gives us.

Config dataclasses call `check_fields` from `__post_init__` (so the Python API is protected as much as the
command line); commands check their plain numbers with `check_value`. Each failure is a `ConfigError` whose
message names the flag (and the config field), what was wanted, what came, and the fix.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import MISSING, fields
from typing import Any


class ConfigError(ValueError):
    """A setting a person can fix; the message names the flag or field, the problem and the fix."""


class Rule:
    """What one field may hold. `kind` is int, float, bool, str or a tuple of the allowed values."""

    def __init__(self, kind, *, low=None, high=None, low_open: bool = False, optional: bool = False,
                 fix: str = ""):
        self.kind, self.low, self.high, self.low_open = kind, low, high, low_open
        self.optional, self.fix = optional, fix

    def describe(self) -> str:
        if isinstance(self.kind, tuple):
            return f"one of {', '.join(map(str, self.kind))}"
        what = {int: "an integer", float: "a finite number", bool: "true or false", str: "a non-empty text"}[self.kind]
        if self.low is not None and self.high is not None and not self.low_open:
            what += f" in [{self.low:g}, {self.high:g}]"
        elif self.low is not None:
            what += f" {'>' if self.low_open else '>='} {self.low:g}"
            if self.high is not None:
                what += f" and <= {self.high:g}"
        elif self.high is not None:
            what += f" <= {self.high:g}"
        return what + (" (or unset)" if self.optional else "")

    def ok(self, value: Any) -> bool:
        if value is None:
            return self.optional
        if isinstance(self.kind, tuple):
            return not isinstance(value, bool) and any(type(value) is type(k) and value == k for k in self.kind)
        if self.kind is bool:
            return isinstance(value, bool)
        if self.kind is str:
            return isinstance(value, str) and bool(value.strip())
        if isinstance(value, bool) or not isinstance(value, int | float):
            return False
        if self.kind is int and not isinstance(value, int):
            return False
        if not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or value <= self.high


def label(name: str, flag: str | None) -> str:
    """`--z-dim (model.z_dim)`, or the field alone where no flag sets it."""
    return f"{flag} ({name})" if flag else name


def check_value(value: Any, rule: Rule, name: str, *, flag: str | None = None, example: Any = None) -> None:
    """Raise ConfigError unless value satisfies rule."""
    if rule.ok(value):
        return
    fix = rule.fix
    if not fix and example is not None:
        shown = str(example).lower() if isinstance(example, bool) else example
        as_flag = flag or (name if name.startswith("--") else None)
        fix = f"pass e.g. {as_flag} {shown}" if as_flag else f"set it to e.g. {shown!r}"
    message = f"{label(name, flag)} must be {rule.describe()}, got {value!r}"
    raise ConfigError(message + (f". Fix: {fix}" if fix else ""))


def check_flags(*checks: tuple[str, Any, Rule, Any]) -> None:
    """A command's own numbers and choices: (flag, value, rule, an example value for the fix)."""
    for flag, value, rule, example in checks:
        check_value(value, rule, flag, example=example)


SEED = Rule(int, low=0, high=2**32 - 1)
"""numpy's seed range (torch takes more)."""
THREADS = Rule(int, low=1, high=4096, optional=True, fix="pass --threads 1 or more, or leave it out for torch's "
                                                          "default")
COUNT = Rule(int, low=1)


def check_fields(obj: Any, rules: dict[str, Rule], *, section: str = "", flags: dict[str, str] | None = None) -> None:
    """Check the dataclass fields named in rules; the message uses section.field and the field's flag, and
    suggests the field's default as an example value."""
    defaults = {f.name: f.default for f in fields(obj) if f.default is not MISSING}
    for name, rule in rules.items():
        check_value(getattr(obj, name), rule, f"{section}.{name}" if section else name,
                    flag=(flags or {}).get(name), example=defaults.get(name))


def unknown_keys(given: Iterable[str], known: Iterable[str], where: str) -> None:
    """Refuse keys a config section does not have (a typo, or a file of another program or version)."""
    extra = sorted(set(given) - set(known))
    if extra:
        raise ConfigError(f"{where}: unknown field{'s' if len(extra) > 1 else ''} {', '.join(map(repr, extra))}; "
                          f"known fields: {', '.join(sorted(known))}. Fix: correct or remove "
                          f"{'them' if len(extra) > 1 else 'it'}")
