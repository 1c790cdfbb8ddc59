"""`cmvae-engine report RUN_DIR`: one self-contained HTML page of a run.

Everything is inlined (CSS, plots and sample grids as base64 PNG), so the file can be mailed or archived alone.
Reads what the run folder holds and skips what it lacks: config.json, run_info.json, metrics.jsonl, steps.jsonl,
clusters.json, eval.json, prune.json and prune.png, recon.png, samples.png and generate's grids
(generated/generate.json). Warnings that change how a number should be read (weak coherence classifiers,
clusters that have not formed) stand at the top of the page, never folded away.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import io
import json
import math
import re
from pathlib import Path
from typing import Any

from cmvae_engine.engine.checkpoint import atomic_write_text
from cmvae_engine.engine.progress import format_duration
from cmvae_engine.engine.report_plots import fit_events, prior_mass_plot, split_log, step_plot, warm_start_plot

EVAL_SECTIONS = {
    "clustering": ("Clustering", "NMI, ARI and ACC (Hungarian matching) of the cluster assignment against the "
                                 "labels: majority vote over modalities and each modality alone."),
    "coherence": ("Coherence", "Share of generated images that a digit classifier labels consistently: "
                               "conditional (source to target modality) and unconditional (all modalities agree)."),
    "fid": ("FID", "Frechet Inception distance between generated and test images (lower is better)."),
    "latent_classification": ("Latent classification", "Accuracy of a logistic regression predicting the label "
                                                        "from z (shared) and from w (private); z should carry the "
                                                        "label, w should not."),
}
METRIC_NAMES = {"train_loss": "train loss (nats / tuple)", "test_bound": "test bound (nats / tuple)",
                "test_nmi": "test NMI", "test_ari": "test ARI", "test_acc": "test ACC",
                "test_n_clusters": "clusters used (test)", "samples_per_s": "samples / s", "elapsed_s": "elapsed"}

CSS = """
:root { --ink:#1d2430; --muted:#5b6576; --line:#e2e6ee; --bg:#f6f7fa; --accent:#1f5fa8; --good:#2a9d55;
        --warn:#b7791f; }
* { box-sizing: border-box; }
body { margin:0; background:var(--bg); color:var(--ink);
       font: 15px/1.5 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1140px; margin: 0 auto; padding: 28px 32px 48px; }
header h1 { margin: 0 0 4px; font-size: 26px; }
header .sub { color: var(--muted); margin: 0; }
nav { margin: 14px 0 6px; font-size: 14px; }
nav a { color: var(--accent); text-decoration: none; margin-right: 16px; }
section { background: #fff; border: 1px solid var(--line); border-radius: 10px; padding: 18px 22px;
          margin-top: 18px; }
h2 { margin: 0 0 6px; font-size: 19px; }
h3 { margin: 18px 0 6px; font-size: 16px; }
p.explain { color: var(--muted); margin: 0 0 12px; font-size: 14px; max-width: 860px; }
.cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(165px, 1fr)); gap: 12px; margin-top: 18px; }
.card { background: #fff; border: 1px solid var(--line); border-radius: 10px; padding: 12px 14px; }
.card .label { color: var(--muted); font-size: 12px; text-transform: uppercase; letter-spacing: .04em; }
.card .value { font-size: 22px; font-weight: 600; margin-top: 2px; }
.card .hint { color: var(--muted); font-size: 12px; }
table { border-collapse: collapse; font-size: 13.5px; margin: 6px 0 10px; }
th, td { padding: 5px 12px; border-bottom: 1px solid var(--line); text-align: left; vertical-align: top; }
th { background: #f0f3f8; font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.chosen td { background: #e8f6ee; font-weight: 600; }
.cols { display: grid; grid-template-columns: repeat(auto-fit, minmax(300px, 1fr)); gap: 8px 28px; }
figure { margin: 10px 0 16px; }
figure img { max-width: 100%; border: 1px solid var(--line); border-radius: 6px; }
figure img.pixels { image-rendering: pixelated; }
.gallery { display: flex; flex-wrap: wrap; gap: 0 26px; align-items: flex-start; }
.gallery figure { max-width: 100%; }
.gallery figcaption { max-width: 420px; }
figcaption { color: var(--muted); font-size: 13px; margin-top: 4px; }
.tag { display: inline-block; font-size: 12px; padding: 1px 8px; border-radius: 10px; background: #eef2f8;
       color: var(--muted); margin-left: 6px; vertical-align: middle; }
.tag.warn { background: #fdf3e1; color: var(--warn); }
.tag.good { background: #e8f6ee; color: var(--good); }
.note { border-left: 3px solid var(--warn); background: #fdf8ee; padding: 8px 12px; margin: 8px 0 12px;
        font-size: 14px; }
.missing { color: var(--muted); font-style: italic; }
.alert { border: 1px solid #e0b252; border-left: 5px solid var(--warn); background: #fdf3e1; border-radius: 8px;
         padding: 10px 14px; margin-top: 16px; font-size: 14.5px; }
.alert b { color: var(--warn); }
td.heat { text-align: right; font-variant-numeric: tabular-nums; min-width: 34px; }
code.cmd { display: block; white-space: pre-wrap; word-break: break-all; background: #f0f3f8; padding: 6px 10px;
           border-radius: 6px; font-size: 12.5px; }
details summary { cursor: pointer; color: var(--accent); font-size: 14px; margin: 6px 0; }
footer { color: var(--muted); font-size: 12px; margin-top: 22px; text-align: center; }
"""


# ----- small helpers ------------------------------------------------------------------------------------------
def esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def fmt(v: Any) -> str:
    """A number as a person reads it: ints with separators, floats to 4 significant digits."""
    if v is None:
        return "&mdash;"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if math.isnan(v):
            return "n/a"
        if v != 0 and (abs(v) >= 1e6 or abs(v) < 5e-4):
            return f"{v:.2e}"
        if abs(v) < 1:
            return f"{v:.3f}".rstrip("0").rstrip(".") if v == round(v, 3) else f"{v:.3f}"
        return f"{v:,.4g}" if abs(v) < 1000 else f"{v:,.1f}"
    if isinstance(v, list) and all(not isinstance(i, dict | list) for i in v):
        return ", ".join(fmt(i) if isinstance(i, float) else esc(i) for i in v)
    return esc(v)


def _is_scalar(v: Any) -> bool:
    return v is None or isinstance(v, bool | int | float | str) or (
        isinstance(v, list) and all(not isinstance(i, dict | list) for i in v))


def _cell(v: Any) -> str:
    cls = ' class="num"' if isinstance(v, int | float) and not isinstance(v, bool) else ""
    return f"<td{cls}>{fmt(v)}</td>"


def png_data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


# Width of the page's content in CSS pixels: wider images are scaled down to it.
CONTENT_WIDTH = 1076


def png_width(data: bytes) -> int:
    """Width from the PNG header (IHDR: bytes 16..20, big-endian); 0 when not a PNG."""
    return int.from_bytes(data[16:20], "big") if data[:8] == b"\x89PNG\r\n\x1a\n" else 0


def figure(data: bytes, caption: str = "", pixels: bool = False, alt: str = "", file: str = "") -> str:
    cls = ' class="pixels"' if pixels else ""
    if file and png_width(data) > CONTENT_WIDTH:
        caption = caption.rstrip(".") + f". Scaled to the page; full size in {file}."
    cap = f"<figcaption>{esc(caption)}</figcaption>" if caption else ""
    return f'<figure><img{cls} alt="{esc(alt or caption)}" src="{png_data_uri(data)}">{cap}</figure>'


KEY_NAMES = {"nmi": "NMI", "ari": "ARI", "acc": "ACC", "fid": "FID", "n_clusters": "clusters used",
             "n_test": "test tuples", "n_train": "train tuples", "n": "tuples", "active_clusters": "active clusters",
             "chance": "chance level", "mean": "mean", "per_modality": "per modality"}
# Columns in this order first (scores before counts), the rest as they come.
COLUMN_ORDER = ("nmi", "ari", "acc", "fid", "coherence", "n_clusters")


def label(key: Any) -> str:
    k = str(key)
    return KEY_NAMES.get(k, k.replace("_", " "))


def kv_table(rows: list[tuple[str, Any]]) -> str:
    body = "".join(f"<tr><th>{esc(k)}</th>{_cell(v)}</tr>" for k, v in rows)
    return f"<table>{body}</table>"


def _is_flat_dict(v: Any) -> bool:
    return isinstance(v, dict) and bool(v) and all(_is_scalar(x) for x in v.values())


def _matrix(rows: list[tuple[str, dict]]) -> str:
    cols = list(dict.fromkeys(c for _, v in rows for c in v))
    cols.sort(key=lambda c: COLUMN_ORDER.index(c) if c in COLUMN_ORDER else len(COLUMN_ORDER))
    head = "<th></th>" + "".join(f"<th>{esc(label(c))}</th>" for c in cols)
    body = "".join(f"<tr><th>{esc(k)}</th>" + "".join(_cell(v.get(c)) for c in cols) + "</tr>" for k, v in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def render_value(obj: Any, depth: int = 0) -> str:
    """Any JSON value as tables, whatever shape a metrics file has: scalars as key/value rows; flat dicts
    side by side (and those one level further down, e.g. per modality) as the rows of one matrix; anything
    deeper as headed sub-sections."""
    if _is_scalar(obj):
        return f"<p>{fmt(obj)}</p>"
    if isinstance(obj, list):
        if obj and all(_is_flat_dict(i) for i in obj):
            return _matrix([(str(i), d) for i, d in enumerate(obj)])
        return "".join(render_value(i, depth + 1) for i in obj)
    flat = [(label(k), v) for k, v in obj.items() if _is_scalar(v)]
    nested = [(k, v) for k, v in obj.items() if not _is_scalar(v)]
    rows: list[tuple[str, dict]] = []
    rest = []
    for k, v in nested:
        if _is_flat_dict(v):
            rows.append((label(k), v))
        elif isinstance(v, dict) and v and all(_is_flat_dict(x) for x in v.values()):
            rows += [(str(kk), vv) for kk, vv in v.items()]
        else:
            rest.append((k, v))
    parts = [kv_table(flat)] if flat else []
    if len(rows) >= 2:
        rows.sort(key=lambda r: r[0] != "vote")  # the combined assignment above the per-modality rows
        parts.append(_matrix(rows))
    else:  # a single flat dict reads better as its own headed table
        rest = nested
    tag = "h3" if depth == 0 else "h4"
    for k, v in rest:
        parts.append(f"<{tag}>{esc(label(k))}</{tag}>" + render_value(v, depth + 1))
    return "".join(parts)


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def read_metrics(path: Path) -> list[dict]:
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue  # a line cut by an interrupted run
    return rows


# ----- plots ------------------------------------------------------------------------------------------------------
def training_plot(rows: list[dict]) -> bytes | None:
    """PNG: loss and test bound per epoch; test NMI/ARI/ACC per epoch (when the run evaluated them)."""
    if not rows:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    ep = [r.get("epoch") for r in rows]
    has_scores = any("test_nmi" in r for r in rows)
    fig = Figure(figsize=(11, 3.4) if has_scores else (6, 3.4), dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2 if has_scores else 1, squeeze=False)[0]
    ax = axes[0]
    ax.plot(ep, [r.get("train_loss") for r in rows], "o-", ms=3, color="#1f5fa8", label="train loss")
    tb = [(r["epoch"], -r["test_bound"]) for r in rows if "test_bound" in r]
    if tb:
        ax.plot(*zip(*tb, strict=True), "s-", ms=3, color="#d9822b", label="test loss (minus the bound)")
    losses = [r["train_loss"] for r in rows if r.get("train_loss")] + [v for _, v in tb]
    losses = [v for v in losses if v > 0]
    if losses and max(losses) / min(losses) > 20:
        ax.set_yscale("log")
    ax.set_title("loss (nats per tuple)")
    for i, (key, color) in enumerate((("test_nmi", "#1f5fa8"), ("test_ari", "#d9822b"), ("test_acc", "#2a9d55"))):
        pts = [(r["epoch"], r[key]) for r in rows if key in r]
        if has_scores and pts:
            axes[1].plot(*zip(*pts, strict=True), "os^"[i] + "-", ms=3, color=color, label=key[5:].upper())
    if has_scores:
        axes[1].set_title("test clustering (majority vote)")
        axes[1].set_ylim(-0.05, 1.05)
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


# ----- sections ---------------------------------------------------------------------------------------------------
def _section(sid: str, title: str, explain: str, body: str) -> str:
    ex = f'<p class="explain">{explain}</p>' if explain else ""
    return f'<section id="{sid}"><h2>{esc(title)}</h2>{ex}{body}</section>'


def config_section(cfg: dict | None, data: dict | None) -> str:
    if not cfg:
        return _section("config", "Configuration", "", '<p class="missing">no config.json in this run folder</p>')
    model, optim, dcfg = cfg.get("model", {}), cfg.get("optim", {}), cfg.get("data", {})
    width = model.get("width", 1.0)
    width_label = f"{width:g} (reduced networks)" if width < 1 else f"{width:g} (reference size)"
    groups = {
        "Model": [("kind", model.get("kind")), ("clusters K", model.get("n_clusters")),
                  ("modalities M", model.get("n_modalities")), ("shared latent Dz", model.get("z_dim")),
                  ("private latent Dw", model.get("w_dim")), ("latent family", model.get("family")),
                  ("network width", width_label), ("learned cluster scales", model.get("learn_scales"))],
        "Objective and optimiser": [("objective", cfg.get("objective")), ("importance samples S", cfg.get("n_samples")),
                                    ("beta", cfg.get("beta")), ("recipe", cfg.get("recipe")),
                                    ("learning rate", optim.get("lr")), ("batch size", optim.get("batch_size")),
                                    ("epochs", optim.get("epochs")), ("max steps", optim.get("max_steps")),
                                    ("AMSGrad", optim.get("amsgrad")), ("seed", cfg.get("seed"))],
        "Data": [("data set", (data or {}).get("name") or dcfg.get("dataset")), ("path", dcfg.get("dataset")),
                 ("modalities", (data or {}).get("modalities")),
                 ("tuples per split", ", ".join(f"{k} {v:,}" for k, v in ((data or {}).get("n") or {}).items())),
                 ("device", cfg.get("device"))],
    }
    cols = "".join(f"<div><h3>{esc(name)}</h3>{kv_table(rows)}</div>" for name, rows in groups.items())
    return _section("config", "Configuration", "How the run was trained (from config.json).",
                    f'<div class="cols">{cols}</div>')


def training_section(rows: list[dict], log: list[dict] | None = None) -> str:
    if not rows and not log:
        return _section("training", "Training", "", '<p class="missing">no metrics.jsonl in this run folder</p>')
    explain = ("The loss is minus the IWAE bound per tuple (lower is better); the test curve uses held-out data. "
               "Clustering scores compare the majority-vote cluster of each test tuple with its label, using all "
               "K clusters (before selection).")
    steps_rows, events = split_log(log or [])
    parts = []
    if steps_rows:
        png = step_plot(steps_rows, events)
        parts.append("<h3>Per step</h3>" + (figure(png, f"{len(steps_rows)} log intervals from steps.jsonl (up to "
                                                       f"step {fmt(steps_rows[-1]['step'])})") if png else
                                            '<p class="missing">one log interval: no curve to draw.</p>'))
    warm = warm_start_plot(events)
    if warm:
        parts.append("<h3>Warm start and the recipe's checks</h3>" + figure(
            warm, "Left: the contrastive warm start of the z towers before step 1. Right: the label-free signal "
                  "the recipe watches (cross-modal agreement of k-means on the posterior means) and, after the "
                  "prior fit, the clusters in use; dashed lines mark fits and refits of the prior."))
    parts.append(events_table(events))
    if rows:
        steps = f"{fmt(rows[-1].get('step'))} optimiser steps"
        if len(rows) < 2:  # one point is no curve: the numbers are in the metrics table
            parts.insert(0, f'<h3>Per epoch</h3><p class="missing">one epoch logged ({steps}): no curves to draw; '
                            "its numbers are in the metrics table below.</p>")
        else:
            parts.insert(0, "<h3>Per epoch</h3>" + figure(training_plot(rows), f"{len(rows)} epochs, {steps}"))
    return _section("training", "Training", explain, "".join(parts))


def events_table(events: list[dict]) -> str:
    """The recipe's prior fits and refits, and the warm start's summary."""
    rows = []
    for e in events:
        if e.get("event") == "warm_start_done":
            secs = e.get("seconds")
            rows.append(("warm start done", 0, f"{fmt(e.get('warm_steps'))} z-tower steps"
                         + (f" in {format_duration(secs)}" if secs else "")))
        elif e in fit_events(events):
            agree = e.get("agreement")
            rows.append(("prior fit" if e["event"] == "prior_fit" else "prior refit", e["step"],
                         f"{e.get('reason', '')}; {fmt(e.get('in_use'))} clusters in use"
                         + (f"; agreement {agree:.3f}" if isinstance(agree, float) else "")))
    if not rows:
        return ""
    body = "".join(f"<tr><td>{esc(a)}</td>{_cell(b)}<td>{esc(c)}</td></tr>" for a, b, c in rows)
    return f"<h3>Recipe events</h3><table><tr><th>event</th><th>step</th><th>detail</th></tr>{body}</table>"


def metrics_section(rows: list[dict], evaluation: dict | None) -> str:
    blocks, parts, wide = [], [], []
    if rows:
        last = rows[-1]
        keys = [k for k in last if k not in ("width", "reduced")]
        shown = [(METRIC_NAMES.get(k, k), format_duration(last[k]) if k == "elapsed_s" else last[k]) for k in keys]
        blocks.append(f"<div><h3>Last epoch</h3>{kv_table(shown)}</div>")
    if evaluation:
        for key, (title, explain) in EVAL_SECTIONS.items():
            if evaluation.get(key) is not None:
                section = evaluation[key]
                if key == "coherence":  # a matrix with modality names: the whole width
                    wide.append(f"<h3>{esc(title)}</h3><p class=\"explain\">{esc(explain)}</p>"
                                + coherence_block(section, evaluation.get("modalities")))
                    continue
                body = render_value({k: v for k, v in section.items() if k != "confusion"}, depth=1)
                blocks.append(f"<div><h3>{esc(title)}</h3><p class=\"explain\">{esc(explain)}</p>{body}</div>")
        about = [(k, evaluation.get(k)) for k in ("checkpoint", "split", "n", "device", "seed")]
        about += [("notes", "; ".join(evaluation.get("notes") or []) or None)]
        about += [(f"time: {k.removesuffix('_s')}", format_duration(v))
                  for k, v in (evaluation.get("timings") or {}).items()]
        parts.append("<details><summary>evaluation settings and timings</summary>" + kv_table(about) + "</details>")
    else:
        parts.append('<p class="missing">no eval.json yet: run <code>cmvae-engine eval RUN_DIR</code> for '
                     'clustering per modality, coherence, FID and latent classification.</p>')
    return _section("metrics", "Metrics", "The training log's last row, then the evaluation suite "
                    "(<code>cmvae-engine eval</code>) when it has been run.",
                    f'<div class="cols">{"".join(blocks)}</div>' + "".join(wide) + "".join(parts))


def _modality_names(names: list[str] | None, m: int) -> list[str]:
    names = list(names or [])
    return names if len(names) == m else [f"m{i}" for i in range(m)]


def coherence_block(coh: dict, modalities: list[str] | None) -> str:
    """The conditional coherence as a source x target matrix with modality names, then the rest."""
    parts = []
    cond = coh.get("conditional") or {}
    mat = cond.get("matrix")
    if isinstance(mat, list) and mat and all(isinstance(r, list) for r in mat):
        names = _modality_names(modalities, len(mat))
        head = '<th>source &darr; / target &rarr;</th>' + "".join(f"<th>{esc(n)}</th>" for n in names)
        body = "".join(f"<tr><th>{esc(names[i])}</th>" + "".join(
            f'<td class="num"{" style=color:#5b6576" if i == j else ""}>{fmt(float(v))}</td>'
            for j, v in enumerate(row)) + "</tr>" for i, row in enumerate(mat))
        parts.append(f"<table><tr>{head}</tr>{body}</table><p class=\"explain\">Row: the modality encoded; column: "
                     "the modality generated from its z. The diagonal (grey) is a self-reconstruction (the source's "
                     "own w) and is left out of the average "
                     f"({fmt(cond.get('average'))}, over source &ne; target, as the reference).</p>")
    rest = {k: v for k, v in coh.items() if k not in ("conditional", "classifiers", "weak_classifiers")}
    if cond and not mat:
        rest["conditional"] = cond
    clf = coh.get("classifiers") or {}
    if clf.get("test_accuracy"):
        rest["classifier test accuracy"] = clf["test_accuracy"]
    if clf.get("kind"):
        rest["classifiers"] = f"{clf['kind']} ({clf.get('folder', '')})"
    return "".join(parts) + render_value(rest, depth=1)


def weak_classifier_warning(evaluation: dict | None) -> str | None:
    """The eval's warning about weak coherence classifiers, or one made from the recorded accuracies."""
    coh = (evaluation or {}).get("coherence") or {}
    if coh.get("weak_classifiers"):
        return coh["weak_classifiers"]
    acc = (coh.get("classifiers") or {}).get("test_accuracy") or []
    weak = [f"m{m} {a:.3f}" for m, a in enumerate(acc) if isinstance(a, int | float) and a < WEAK_ACCURACY]
    return (f"weak digit classifiers ({', '.join(weak)}): below {WEAK_ACCURACY:.0%} test accuracy; coherence "
            "measured with them says little about the model" if weak else None)


WEAK_ACCURACY = 0.9
"""As cmvae.evaluation.classifier.WEAK_ACCURACY (not imported: the report needs no torch)."""


def warnings_html(evaluation: dict | None, prune: dict | None, cfg: dict | None) -> str:
    """Warnings that change how the page's numbers read, at the top and never folded away."""
    items = []
    weak = weak_classifier_warning(evaluation)
    if weak:
        items.append(f"<b>Coherence:</b> {esc(weak)}.")
    if prune and prune.get("falls_throughout"):
        items.append("<b>Cluster selection:</b> the score fell at every step down to 2 clusters: the prior's "
                     "clusters have probably not formed yet (train longer); the chosen K means little.")
    if prune and prune.get("split_fallback"):
        items.append("<b>Cluster selection:</b> the data set has no valid split; clusters were selected on the "
                     "TEST split, so its test scores are not held out.")
    width = ((cfg or {}).get("model") or {}).get("width", 1.0)
    if isinstance(width, int | float) and width < 1:
        items.append(f"<b>Reduced model:</b> network width {width:g} of the reference's; compare with care.")
    items = [re.sub(r"`([^`]+)`", r"<code>\1</code>", i) for i in items]  # commands in the messages
    return "".join(f'<div class="alert">{i}</div>' for i in items)


def provenance_section(info: dict | None, rows: list[dict], log: list[dict], evaluation: dict | None,
                       prune: dict | None, generated: dict | None) -> str:
    """Command lines, versions, commit, machine and time of every step that made this page's contents."""
    sessions = (info or {}).get("sessions") or []
    parts = []
    entries = [(("resumed training" if s.get("resumed") else "training"), s) for s in sessions]
    entries += [(name, doc["run_info"]) for name, doc in (("eval", evaluation), ("prune", prune),
                                                         ("generate", generated)) if doc and doc.get("run_info")]
    for name, s in entries:
        rows_kv = [("started (UTC)", s.get("started")), ("commit", s.get("commit")), ("torch", s.get("torch")),
                   ("CUDA", s.get("cuda")), ("python", s.get("python")), ("device", s.get("device_name")),
                   ("working folder", s.get("cwd"))]
        parts.append(f"<h3>{esc(name)}</h3><code class='cmd'>{esc(s.get('command', '?'))}</code>"
                     + kv_table([(k, v) for k, v in rows_kv if v is not None]))
    if not entries:
        parts.append('<p class="missing">no run_info.json: this run was trained before the engine recorded its '
                     "command line, versions and commit.</p>")
    timing = []
    if rows:
        timing.append(("training (all sessions, wall)", format_duration(rows[-1].get("elapsed_s", float("nan")))))
        if rows[-1].get("samples_per_s"):
            timing.append(("training throughput", f"{rows[-1]['samples_per_s']:,.0f} samples/s"))
    warm = [e for e in split_log(log)[1] if e.get("event") == "warm_start_done" and e.get("seconds")]
    if warm:
        timing.append(("of which the warm start", format_duration(warm[-1]["seconds"])))
    if evaluation and (evaluation.get("timings") or {}).get("total_s") is not None:
        timing.append(("eval", format_duration(evaluation["timings"]["total_s"])))
    if prune and (prune.get("timing") or {}).get("total_s") is not None:
        timing.append(("prune", format_duration(prune["timing"]["total_s"])))
    if generated and generated.get("seconds") is not None:
        timing.append(("generate", format_duration(generated["seconds"])))
    if timing:
        parts.append("<h3>Timing</h3>" + kv_table(timing))
    return _section("provenance", "How this run was made", "The command lines, the code's commit, torch and the "
                    "machine of each step, recorded when it started (run_info.json and the run_info of eval.json, "
                    "prune.json and generate.json).", "".join(parts))


def _confusion(evaluation: dict | None, prune: dict | None) -> tuple[dict | None, str]:
    conf = ((evaluation or {}).get("clustering") or {}).get("confusion")
    if conf:
        return conf, (f"eval.json: the {esc(evaluation.get('split', '?'))} split, model "
                      f"{esc(evaluation.get('checkpoint', '?'))}")
    conf = ((prune or {}).get("test") or {}).get("confusion")
    return conf, "prune.json: the test split, the selected clusters"


def confusion_table(conf: dict) -> str:
    """Cluster x label counts; clusters ordered by their most frequent label, cells shaded by row share."""
    counts, clusters, labels = conf["counts"], conf["clusters"], conf["labels"]
    order = sorted(range(len(clusters)), key=lambda i: (max(range(len(labels)), key=lambda j: counts[i][j]),
                                                        -sum(counts[i])))
    head = "<th>cluster &darr; / label &rarr;</th>" + "".join(f"<th>{esc(v)}</th>" for v in labels) + "<th>tuples</th>"
    body = []
    for i in order:
        total = max(sum(counts[i]), 1)
        cells = "".join(f'<td class="heat" style="background: rgba(31,95,168,{0.85 * v / total:.2f});'
                        f'{" color:#fff;" if v / total > 0.5 else ""}">{v if v else ""}</td>' for v in counts[i])
        body.append(f"<tr><th>{esc(clusters[i])}</th>{cells}<td class=\"num\">{sum(counts[i]):,}</td></tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def clusters_section(evaluation: dict | None, prune: dict | None, clusters: dict | None) -> str:
    parts = []
    conf, source = _confusion(evaluation, prune)
    if conf and conf.get("counts"):
        parts.append(f"<h3>Clusters against labels</h3><p class=\"explain\">Tuples of each cluster (majority vote over "
                     f"modalities) by label ({source}). A cluster that found a class has one dark cell; a class "
                     "split over clusters shows in several rows.</p>" + confusion_table(conf))
    masses = (prune or {}).get("prior_mass") or {}
    before = masses.get("before") or (clusters or {}).get("prior_mass")
    png = prior_mass_plot(before, masses.get("after"))
    if png:
        parts.append("<h3>Prior masses</h3>" + figure(png, "Mixing weight pi of every cluster at the end of training"
                                                           + (" and after pruning" if masses.get("after") else "")
                                                           + " (clusters.json, prune.json)."))
    if not parts:
        return _section("clusters", "Clusters", "", '<p class="missing">no cluster counts or prior masses yet: '
                        "<code>cmvae-engine prune RUN_DIR</code> or <code>cmvae-engine eval RUN_DIR</code> records "
                        "them.</p>")
    return _section("clusters", "Clusters", "", "".join(parts))


def prune_section(run_dir: Path, prune: dict | None) -> str:
    if not prune:
        return _section("pruning", "Cluster selection", "",
                        '<p class="missing">not run yet: <code>cmvae-engine prune RUN_DIR</code> selects the number '
                        'of clusters.</p>')
    explain = ("Starting from all K clusters, the least used cluster is removed step by step (its prior mass set to "
               "zero). Each step is scored on the selection split by the penalised normalised entropy, PNE = beta x "
               "mean normalised entropy of p(c|z) minus mean log p(z) / Dz; the set with the lowest PNE below the "
               "unpruned score is kept. Test scores use the kept clusters.")
    test = prune.get("test", {})
    if not prune.get("improved"):
        tag = '<span class="tag warn">kept all clusters</span>'
    elif prune.get("falls_throughout"):
        tag = '<span class="tag warn">clusters not formed?</span>'
    else:
        tag = '<span class="tag good">pruned</span>'
    cards = [("chosen K", prune.get("chosen_k"), f"of {prune.get('initial_k')}"),
             ("test NMI", test.get("nmi"), ""), ("test ARI", test.get("ari"), ""), ("test ACC", test.get("acc"), ""),
             ("selection time", f"{prune.get('timing', {}).get('select_s', float('nan')):.2f} s",
              f"{len(prune.get('curve', []))} steps on {prune.get('n', '?')} tuples")]
    body = _cards(cards) + f'<div class="note">{esc(prune.get("note", ""))} {tag}</div>'
    png = run_dir / "prune.png"
    if png.is_file():
        body += figure(png.read_bytes(), "PNE, NMI and ARI against the number of active clusters; the green line "
                                         "marks the chosen set.")
    work = prune.get("work") or {}
    ref = work.get("reference") or {}
    if ref:
        body += (f"<p class=\"explain\">Selection here: one encoder pass, no decoder. The reference procedure "
                 f"re-encodes the split and runs all decoders at each of its {fmt(ref.get('steps'))} steps: "
                 f"{fmt(ref.get('encoder_passes'))} encoder and {fmt(ref.get('decoder_passes'))} decoder passes, "
                 f"about {fmt(work.get('network_mac_ratio'))} times the network work.</p>")
    body += "<details><summary>every step</summary>" + _curve_table(prune) + "</details>"
    settings = [("selection split", prune.get("split")), ("beta", prune.get("beta")),
                ("entropy normalisation", prune.get("entropy_norm")), ("assignment", prune.get("assign")),
                ("z draws", prune.get("common_random_numbers")), ("seed", prune.get("seed"))]
    body += "<details><summary>settings</summary>" + kv_table(settings) + "</details>"
    return _section("pruning", "Cluster selection", explain, body)


def _curve_table(prune: dict) -> str:
    curve = prune.get("curve") or []
    if not curve:
        return ""
    keys = [("k", "K"), ("pne", "PNE"), ("entropy", "entropy / log K"), ("loglik", "log p(z) / Dz"),
            ("nmi", "NMI"), ("ari", "ARI"), ("acc", "ACC"), ("test_nmi", "test NMI"), ("test_ari", "test ARI"),
            ("test_acc", "test ACC")]
    keys = [(k, n) for k, n in keys if k in curve[0]]
    head = "".join(f"<th>{esc(n)}</th>" for _, n in keys)
    body = ""
    for e in curve:
        cls = ' class="chosen"' if e.get("active") == prune.get("chosen") else ""
        body += f"<tr{cls}>" + "".join(_cell(e.get(k)) for k, _ in keys) + "</tr>"
    return f"<table><tr>{head}</tr>{body}</table>"


def _cards(cards: list[tuple[str, Any, str]]) -> str:
    out = []
    for label, value, hint in cards:
        v = value if isinstance(value, str) else fmt(value)
        h = f'<div class="hint">{esc(hint)}</div>' if hint else ""
        out.append(f'<div class="card"><div class="label">{esc(label)}</div><div class="value">{v}</div>{h}</div>')
    return f'<div class="cards">{"".join(out)}</div>'


def samples_section(run_dir: Path) -> str:
    parts = []
    fixed = [("recon.png", "Reconstructions: for each modality, a row of test inputs and a row of their "
                           "reconstructions (end of training)."),
             ("samples.png", "Unconditional samples at the end of training, BEFORE pruning: one row per cluster "
                             "by prior mass (labelled with its id and mass pi; at most 16), columns 4 samples of each "
                             "modality.")]
    trained = [figure((run_dir / name).read_bytes(), caption, pixels=True, alt=name, file=name)
               for name, caption in fixed if (run_dir / name).is_file()]
    if trained:
        parts.append(f"<h3>End of training</h3><div class=\"gallery\">{''.join(trained)}</div>")
    gen_dir = run_dir / "generated"
    manifest = read_json(gen_dir / "generate.json") or {}
    files = manifest.get("files") or {p.name: {} for p in sorted(gen_dir.glob("*.png"))}
    if files:
        parts.append(f"<h3>Generated by <code>cmvae-engine generate</code> (model "
                     f"{esc(manifest.get('checkpoint', '?'))})</h3>")
        figs = [figure((gen_dir / name).read_bytes(), info.get("caption", name), pixels=True, alt=name,
                       file=f"generated/{name}") + captions_html(info)
                for name, info in sorted(files.items(), key=lambda kv: _gen_order(kv[0]))
                if (gen_dir / name).is_file()]
        parts.append(f"<div class=\"gallery\">{''.join(figs)}</div>")
    if not parts:
        return _section("samples", "Samples", "", '<p class="missing">no images in this run folder</p>')
    return _section("samples", "Samples", "Image grids at twice the model's resolution, pixels unsmoothed; wide "
                    "grids are scaled to the page.", "".join(parts))


def captions_html(info: dict) -> str:
    """The captions of a generated grid (images + captions models) as text under its figure."""
    caps = info.get("captions")
    if not caps:
        return ""
    items = [(f"c{k}", v) for k, v in caps.items()] if isinstance(caps, dict) else list(enumerate(caps))
    rows = "".join(f"<li><b>{esc(k)}</b>: {esc(v if isinstance(v, str) else ' / '.join(v))}</li>" for k, v in items)
    return f"<details><summary>captions as text</summary><ul>{rows}</ul></details>"


def _gen_order(name: str) -> tuple[int, str]:
    return ({"unconditional.png": 0}.get(name, 1 if name.startswith("cluster_") else 2), name)


def summary_cards(rows: list[dict], prune: dict | None, evaluation: dict | None) -> str:
    last = rows[-1] if rows else {}
    cards = [("epochs", last.get("epoch"), f"{fmt(last.get('step'))} steps" if last else ""),
             ("train loss", last.get("train_loss"), "nats per tuple"),
             ("test bound", last.get("test_bound"), "nats per tuple")]
    if prune:
        t = prune.get("test", {})
        cards += [("clusters", prune.get("chosen_k"), f"selected of {prune.get('initial_k')}"),
                  ("test NMI", t.get("nmi"), "selected clusters"), ("test ACC", t.get("acc"), "selected clusters")]
    elif last:
        cards += [("test NMI", last.get("test_nmi"), "all clusters"),
                  ("test ACC", last.get("test_acc"), "all clusters")]
    naming = (evaluation or {}).get("caption_naming") or {}
    if naming.get("rate") is not None:
        cards.append(("captions name the class", naming["rate"], f"generated from images, {naming.get('n')} tuples"))
    return _cards([c for c in cards if c[1] is not None])


def mfcvae_section(run_dir: Path, cfg: dict | None, evaluation: dict | None) -> str:
    from cmvae_engine.engine.report_mfcvae import mfcvae_section as section

    return section(run_dir, cfg, evaluation)


def build_report(run_dir: str | Path) -> str:
    """The HTML text of a run's report."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"no run folder at {run_dir}; pass the --out folder of `cmvae-engine train`")
    cfg_file = read_json(run_dir / "config.json") or {}
    cfg, data = cfg_file.get("config"), cfg_file.get("data")
    rows = read_metrics(run_dir / "metrics.jsonl")
    prune = read_json(run_dir / "prune.json")
    evaluation = read_json(run_dir / "eval.json")
    log = read_metrics(run_dir / "steps.jsonl")
    info = read_json(run_dir / "run_info.json")
    clusters = read_json(run_dir / "clusters.json")
    generated = read_json(run_dir / "generated" / "generate.json")
    if not (cfg or rows):
        raise FileNotFoundError(f"{run_dir} holds neither config.json nor metrics.jsonl: not a training run folder")
    model = (cfg or {}).get("model", {})
    width = model.get("width", 1.0)
    sub = " &middot; ".join(x for x in [
        esc((data or {}).get("name") or (cfg or {}).get("data", {}).get("dataset", "")),
        f"M = {fmt(model.get('n_modalities'))}", f"K = {fmt(model.get('n_clusters'))}",
        f"width {width:g}" + (' <span class="tag warn">reduced</span>' if width < 1 else ""),
        f"report made {dt.datetime.now().strftime('%Y-%m-%d %H:%M')}"] if x)
    nav = "".join(f'<a href="#{s}">{t}</a>' for s, t in (("config", "Configuration"), ("training", "Training"),
                                                          ("metrics", "Metrics"), ("clusters", "Clusters"),
                                                          ("pruning", "Cluster selection"), ("samples", "Samples"),
                                                          ("provenance", "How it was made")))
    body = "".join([
        f"<header><h1>Run report: {esc(run_dir.resolve().name)}</h1><p class=\"sub\">{sub}</p></header>",
        f"<nav>{nav}</nav>",
        warnings_html(evaluation, prune, cfg),
        summary_cards(rows, prune, evaluation),
        config_section(cfg, data),
        training_section(rows, log),
        metrics_section(rows, evaluation),
        mfcvae_section(run_dir, cfg, evaluation),
        clusters_section(evaluation, prune, clusters),
        prune_section(run_dir, prune),
        samples_section(run_dir),
        _diffusion_section(run_dir),
        provenance_section(info, rows, log, evaluation, prune, generated),
        f"<footer>cmvae-engine report &middot; {esc(run_dir.resolve())}</footer>",
    ])
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><meta name="viewport" '
            f'content="width=device-width, initial-scale=1"><title>Run report: {esc(run_dir.resolve().name)}</title>'
            f"<style>{CSS}</style></head><body><main>{body}</main></body></html>\n")


def _diffusion_section(run_dir: Path) -> str:
    from cmvae_engine.engine.report_diffusion import diffusion_section  # the D-CMVAE stage, when the run has one

    return diffusion_section(run_dir)


def write_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Build the report and write it atomically (default RUN_DIR/report.html)."""
    path = Path(out) if out is not None else Path(run_dir) / "report.html"
    atomic_write_text(path, build_report(run_dir))
    return path
