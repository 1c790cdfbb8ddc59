"""What a run is about to cost: its wall time projected from the first measured steps, said before the user has
waited hours for a run that would take days (the paper recipe at full width on a CPU)."""

from __future__ import annotations

from dataclasses import dataclass

from cmvae_engine.engine.progress import format_duration

LONG_RUN_S = 3600.0
"""Projected wall times above this are announced before training goes on."""
PROBE_STEPS = (1, 4)
"""The projection uses the time between the ends of these steps (step 1 holds one-off costs: allocation,
compilation)."""


@dataclass(frozen=True)
class Projection:
    total_steps: int
    remaining_steps: int
    seconds_per_step: float
    measured_steps: int

    @property
    def remaining_s(self) -> float:
        return self.remaining_steps * self.seconds_per_step


def project(total_steps: int, done_steps: int, seconds: float, measured_steps: int) -> Projection:
    """`measured_steps` steps took `seconds`; `done_steps` of `total_steps` are done."""
    if measured_steps < 1 or seconds < 0:
        raise ValueError(f"need at least one measured step and a time >= 0, got {measured_steps}, {seconds}")
    return Projection(total_steps, max(total_steps - done_steps, 0), seconds / measured_steps, measured_steps)


def cost_warning(p: Projection, what: str, device: str, threshold_s: float | None = None,
                 first_step: bool = False, quick_start_hint: bool = True) -> str | None:
    """The message for a run that will take longer than `threshold_s` (default LONG_RUN_S), or None.

    `what` describes the run (recipe, width, epochs); `device` names where it runs (`cpu`, `cuda`);
    `first_step`: the measurement is the first step alone (one-off costs included); `quick_start_hint`: point a CPU
    user to the README's quick start (for the clustering models it trains)."""
    if p.remaining_s <= (LONG_RUN_S if threshold_s is None else threshold_s):
        return None
    hint = ("; on a CPU the README's quick start (--recipe fast --width 0.125 --epochs 3) reaches clusters in "
            "minutes" if device == "cpu" and quick_start_hint else "")
    measured = (f"the first step took {p.seconds_per_step:.3g} s, one-off costs included; measuring further" if
                first_step else f"measured {p.seconds_per_step:.3g} s/step over {p.measured_steps} steps")
    return (f"{what} = {p.total_steps:,} steps: about {format_duration(p.remaining_s)} more on this {device} "
            f"({measured}){hint}. Stop with Ctrl-C (a checkpoint is written; --resume continues).")
