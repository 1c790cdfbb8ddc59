"""The report's D-CMVAE section: the diffusion stage's scores beside the CMVAE's (eval_diffusion.json) and both
models' samples (generated/diffusion.json's grids, the diffusion run's samples.png). Empty when the run has no
diffusion stage."""

from __future__ import annotations

from pathlib import Path

from cmvae_engine.engine.report import _section, esc, figure, fmt, read_json, read_metrics

NAMES = {"classifier_fd": "classifier-feature distance (lower is better; not FID)", "coherence": "coherence",
         "fid": "FID"}


def scores_table(result: dict) -> str:
    rows = []
    for kind in ("unconditional", "conditional"):
        a, b = result.get(kind, {}).get("cmvae", {}), result.get(kind, {}).get("dcmvae", {})
        for key, name in NAMES.items():
            if key in a and key in b:
                if key == "coherence":
                    change = f"{b[key] - a[key]:+.3f}"
                else:
                    change = f"{(b[key] - a[key]) / a[key]:+.1%}" if a[key] else ""
                rows.append(f"<tr><th>{kind}</th><th>{esc(name)}</th><td>{fmt(a[key])}</td><td>{fmt(b[key])}</td>"
                            f"<td>{change}</td></tr>")
    head = "<tr><th>samples</th><th>metric</th><th>CMVAE</th><th>D-CMVAE</th><th>change</th></tr>"
    return f"<table>{head}{''.join(rows)}</table>"


def diffusion_section(run_dir: Path) -> str:
    folder = run_dir / "diffusion"
    result = read_json(run_dir / "eval_diffusion.json")
    manifest = read_json(run_dir / "generated" / "diffusion.json") or {}
    if not folder.is_dir() and result is None and not manifest:
        return ""
    parts = []
    rows = read_metrics(folder / "metrics.jsonl")
    if rows:
        last = rows[-1]
        parts.append(f"<p>Diffusion stage ({esc(str(folder))}): {fmt(last.get('step'))} steps, denoiser base "
                     f"{fmt(last.get('base'))}{' (reduced)' if last.get('reduced') else ''}, last training loss "
                     f"{fmt(last.get('train_loss'))}, EMA test-subset loss {fmt(last.get('test_eps_loss_ema'))}.</p>")
    if result:
        parts.append(f"<h3>Scores (<code>cmvae-engine eval RUN_DIR --diffusion</code>: {esc(result.get('split'))} "
                     f"split, {esc(result.get('sampler'))} {fmt(result.get('steps'))} steps, "
                     f"{fmt(result.get('n_unconditional'))} unconditional samples, "
                     f"{fmt(result.get('n_conditional'))} conditioning tuples; FID {esc(result.get('fid'))})</h3>")
        parts.append(scores_table(result))
    figs = []
    if (folder / "samples.png").is_file():
        figs.append(figure((folder / "samples.png").read_bytes(), "End of diffusion training: per modality a row of "
                           "CMVAE samples and the same denoised.", pixels=True, alt="samples.png",
                           file="diffusion/samples.png"))
    gen = run_dir / "generated"
    for name, info in sorted((manifest.get("files") or {}).items()):
        if (gen / name).is_file():
            figs.append(figure((gen / name).read_bytes(), info.get("caption", name), pixels=True, alt=name,
                               file=f"generated/{name}"))
    if figs:
        parts.append(f"<div class=\"gallery\">{''.join(figs)}</div>")
    return _section("diffusion", "D-CMVAE (diffusion stage)", "One conditional DDPM per modality on the frozen "
                    "CMVAE's reconstructions (seed paper section 3.3); each D-CMVAE sample denoises the CMVAE sample "
                    "beside it.", "".join(parts))
