"""The report's plots from a run's step log (steps.jsonl) and its prior: per-step curves with the recipe's events,
the warm start's curve, the recipe's checks, the prior masses. Each returns PNG bytes, or None when there is
nothing to draw."""

from __future__ import annotations

import io

BLUE, ORANGE, GREEN, RED, GREY = "#1f5fa8", "#d9822b", "#2a9d55", "#c0392b", "#888888"


def _figure(width: float, height: float, cols: int):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig, fig.subplots(1, cols, squeeze=False)[0]


def _png(fig) -> bytes:
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def split_log(records: list[dict]) -> tuple[list[dict], list[dict]]:
    """(step rows, event rows) of steps.jsonl records."""
    return ([r for r in records if r.get("kind") == "step"], [r for r in records if r.get("kind") == "event"])


def fit_events(events: list[dict]) -> list[dict]:
    return [e for e in events if e.get("event") in ("prior_fit", "prior_refit")]


def step_plot(steps: list[dict], events: list[dict]) -> bytes | None:
    """Loss per tuple at each log interval (with prior fits and refits marked), throughput, and the recipe's
    step scalars (beta, the auxiliary weight) and learning rates."""
    if len(steps) < 2:
        return None
    x = [r["step"] for r in steps]
    fig, axes = _figure(13, 3.3, 3)
    ax = axes[0]
    losses = [r.get("loss") for r in steps]
    ax.plot(x, losses, "-", lw=1.2, color=BLUE, label="train loss")
    positive = [v for v in losses if v and v > 0]
    if positive and max(positive) / min(positive) > 20:
        ax.set_yscale("log")
    for i, e in enumerate(fit_events(events)):
        ax.axvline(e["step"], color=GREEN if e["event"] == "prior_fit" else RED, lw=1, ls="--",
                   label=("prior fit" if e["event"] == "prior_fit" else "prior refit") if i < 2 else None)
    ax.set_title("loss per tuple (each log interval)")
    axes[1].plot(x, [r.get("samples_per_s") for r in steps], "-", lw=1.2, color=ORANGE)
    axes[1].set_title("throughput (samples / s)")
    ax = axes[2]
    shown = False
    for key, color in (("beta", BLUE), ("aux_weight", ORANGE)):
        if any(key in r for r in steps):
            ax.plot(x, [r.get(key) for r in steps], "-", lw=1.2, color=color, label=key.replace("_", " "))
            shown = True
    lrs = [r.get("lr") or [] for r in steps]
    if lrs and lrs[0]:
        twin = ax.twinx()
        for g in range(len(lrs[0])):
            twin.plot(x, [lr[g] if g < len(lr) else None for lr in lrs], ":", lw=1.4, color=[GREEN, RED, GREY][g % 3],
                      label=f"lr group {g}")
        twin.set_ylabel("learning rate")
        twin.legend(fontsize=7, loc="center right")
    ax.set_title("step scalars" if shown else "learning rates")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    return _png(fig)


def warm_start_plot(events: list[dict]) -> bytes | None:
    """The warm start's InfoNCE against its own steps, and (when the recipe checked) the cross-modal agreement
    against the training step with the fits marked."""
    warm = [e for e in events if e.get("event") == "warm_start_loss"]
    checks = [e for e in events if e.get("event") == "check"]
    if not warm and not checks:
        return None
    fig, axes = _figure(11, 3.2, 2)
    if warm:
        axes[0].plot([e["warm_step"] for e in warm], [e["infonce"] for e in warm], "o-", ms=3, color=BLUE)
        axes[0].set_xlabel("warm-start step (z towers only)")
        axes[0].set_title("contrastive warm start: cross-modal InfoNCE")
    else:
        axes[0].text(0.5, 0.5, "no warm start", ha="center", va="center", transform=axes[0].transAxes, color=GREY)
    ax = axes[1]
    agree = [(e["step"], e["agreement"]) for e in checks if e.get("agreement") is not None]
    in_use = [(e["step"], e["in_use"]) for e in checks if e.get("in_use") is not None]
    if agree:
        ax.plot(*zip(*agree, strict=True), "o-", ms=3, color=BLUE, label="agreement (ARI, before the fit)")
        ax.set_ylabel("cross-modal agreement")
    if in_use:
        twin = ax.twinx()
        twin.plot(*zip(*in_use, strict=True), "s-", ms=3, color=ORANGE, label="clusters in use (after)")
        twin.set_ylabel("clusters in use")
        twin.legend(fontsize=7, loc="lower right")
    for e in fit_events(events):
        ax.axvline(e["step"], color=GREEN if e["event"] == "prior_fit" else RED, lw=1, ls="--")
    ax.set_xlabel("training step")
    ax.set_title("the recipe's checks; dashed: prior fit (green), refit (red)")
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="upper left")
    return _png(fig)


def prior_mass_plot(before: list[float] | None, after: list[float] | None) -> bytes | None:
    """Bars of the mixing weights pi per cluster, sorted by mass before pruning; pruned clusters drawn empty."""
    ref = before or after
    if not ref:
        return None
    order = sorted(range(len(ref)), key=lambda c: -ref[c])
    fig, axes = _figure(min(13, 3 + 0.28 * len(ref)), 3.2, 1)
    ax = axes[0]
    pos = list(range(len(order)))
    if before:
        ax.bar([p - 0.2 if after else p for p in pos], [before[c] for c in order], width=0.4 if after else 0.8,
               color=BLUE, label="end of training (before pruning)")
    if after:
        ax.bar([p + 0.2 if before else p for p in pos], [after[c] for c in order], width=0.4 if before else 0.8,
               color=GREEN, label="after pruning (renormalised)")
        gone = [p for p, c in zip(pos, order, strict=True) if after[c] == 0]
        if gone:
            ax.plot(gone, [0] * len(gone), "x", color=RED, ms=5, label="pruned")
    ax.set_xticks(pos, [str(c) for c in order], fontsize=7)
    ax.set_xlabel("cluster id (by prior mass)")
    ax.set_ylabel("prior mass pi")
    ax.set_title("mixture prior: mass of each cluster")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7)
    return _png(fig)
