"""The MFCVAE part of a run's report: every facet against every labelled factor, the latent probes per facet
and the end-of-training facet grids (the generated ones appear with the other generated grids)."""

from __future__ import annotations

from pathlib import Path

from cmvae_engine.engine.mfcvae_outputs import SWAP, facet_grid_name


def _f(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def mfcvae_section(run_dir: Path, cfg: dict | None, evaluation: dict | None) -> str:
    """The "Facets" section (an empty string for other model kinds)."""
    from cmvae_engine.engine.report import _section, esc, figure

    model = (cfg or {}).get("model") or {}
    if model.get("kind") != "mfcvae":
        return ""
    parts = []
    facets = (evaluation or {}).get("facets")
    if facets:
        factors = list(facets[0]["scores"])
        head = "<tr><th>facet</th><th>clusters</th>" + "".join(
            f"<th>{esc(f)} NMI</th><th>{esc(f)} ARI</th><th>{esc(f)} ACC</th><th>{esc(f)} ACC many-to-one</th>"
            for f in factors) + "</tr>"
        body = "".join(
            f"<tr><th>{row['facet']}</th><td>{row.get('used_clusters', '-')} of {row['n_clusters']}</td>" + "".join(
                f"<td>{_f(row['scores'][f]['nmi'])}</td><td>{_f(row['scores'][f]['ari'])}</td>"
                f"<td>{_f(row['scores'][f]['acc'])}</td><td>{_f(row['scores'][f]['acc_many_to_one'])}</td>"
                for f in factors) + "</tr>" for row in facets)
        parts.append(f"<h3>Facets x factors ({esc(evaluation.get('split', '?'))} split)</h3><p class=\"explain\">"
                     "ACC: one cluster per label (Hungarian); ACC many-to-one: each cluster mapped to its majority "
                     f"label, the MFCVAE paper's ACC.</p><table>{head}{body}</table>")
        probes = evaluation.get("latent_probes")
        if probes:
            head = "<tr><th>facet</th>" + "".join(f"<th>{esc(f)}</th>" for f in factors) + "</tr>"
            body = "".join(f"<tr><th>{p['facet']}</th>" + "".join(f"<td>{_f(p['accuracy'].get(f))}</td>"
                                                                   for f in factors) + "</tr>" for p in probes)
            chance = ", ".join(f"{esc(f)} {_f(probes[0]['chance'].get(f))}" for f in factors)
            parts.append(f"<h3>Latent probes</h3><p class=\"explain\">Test accuracy of a logistic regression on "
                         f"the posterior means of each facet's z, per factor (chance: {chance}).</p>"
                         f"<table>{head}{body}</table>")
    else:
        parts.append('<p class="missing">no facet scores yet: run <code>cmvae-engine eval RUN_DIR</code>.</p>')
    grids = [(facet_grid_name(j), f"Facet {j} at the end of training: a row per cluster; in each column the other "
                                  "facets' z are fixed.") for j in range(int(model.get("n_facets", 0)))]
    grids.append((SWAP, "Facet swap: the row image gives facet 0, the column image the deepest facet."))
    figs = [figure((run_dir / name).read_bytes(), caption, pixels=True, alt=name, file=name)
            for name, caption in grids if (run_dir / name).is_file()]
    if figs:
        parts.append(f"<h3>End of training</h3><div class=\"gallery\">{''.join(figs)}</div>")
    return _section("facets", "Facets", "Each facet is one clustering of the data (MFCVAE).", "".join(parts))
