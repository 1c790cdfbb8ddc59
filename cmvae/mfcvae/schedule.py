"""Progressive training of the facets (as the released MFCVAE code does it): the deepest facet trains alone
first, then each next shallower facet is faded in: its decoder-rung weight alpha_j and its KL weight rise
linearly from 0 to 1, after which the facets train together for `solo_steps` before the next one starts."""

from __future__ import annotations


def fade_start(rank: int, solo_steps: int, fade_steps: int) -> int:
    """The step at which the facet of rank r = J-1-j >= 1 starts to fade in: t_r = solo_steps + (r - 1)
    (fade_steps + solo_steps); its fade ends fade_steps later."""
    return solo_steps + (rank - 1) * (fade_steps + solo_steps)


def facet_weights(step: int, n_facets: int, solo_steps: int, fade_steps: int) -> list[float]:
    """Weight (alpha = KL weight) of each facet before the 0-based `step`. Facet J-1 (the deepest) is 1 at every
    step; the facet of rank r = J-1-j >= 1 starts at t_r = solo_steps + (r - 1) (fade_steps + solo_steps) and
    reaches 1 at t_r + fade_steps (at once when fade_steps = 0)."""
    weights = []
    for j in range(n_facets):
        rank = n_facets - 1 - j
        if rank == 0:
            weights.append(1.0)
            continue
        start = fade_start(rank, solo_steps, fade_steps)
        if step < start:
            weights.append(0.0)
        elif fade_steps == 0 or step >= start + fade_steps:
            weights.append(1.0)
        else:
            weights.append((step - start) / fade_steps)
    return weights


def schedule_end(n_facets: int, solo_steps: int, fade_steps: int) -> int:
    """The first step at which every facet has weight 1."""
    return 0 if n_facets == 1 else fade_start(n_facets - 1, solo_steps, fade_steps) + fade_steps
