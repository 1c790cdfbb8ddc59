"""`cmvae-engine bench kernels`: the fused ops against torch eager and torch.compile of the references."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from cmvae_engine.cmvae.checks import THREADS, check_flags

Opt = typer.Option


def _pick(value: str, allowed: tuple[str, ...], flag: str) -> list[str]:
    if value == "all":
        return list(allowed)
    chosen = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in chosen if v not in allowed]
    if bad or not chosen:
        raise typer.BadParameter(f"{bad or value!r} not among {','.join(allowed)} (or `all`)", param_hint=flag)
    return chosen


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def bench_kernels_command(
    ops: Annotated[str, Opt(help="Comma-separated ops: mixture_logpdf,moe_logq,importance_weights,image_loglik "
                                 "(default all).")] = "all",
    backends: Annotated[str, Opt(help="Comma-separated backends: eager,compile,triton,ext (default all).")] = "all",
    device: Annotated[str, Opt(help="auto | cpu | cuda | cuda:N.")] = "auto",
    quick: Annotated[bool | None, Opt("--quick/--full", help="A representative subset (default on CPU, ~2-3 min "
                                                            "on 2 cores) or every shape (default on CUDA).")] = None,
    tiny: Annotated[bool, Opt(help="One small shape per op (seconds): a smoke test of the benchmark itself.")] = False,
    training: Annotated[bool, Opt(help="The training step's shapes (M=5, B=128, K=40, D=32, S=1 and 10) and the "
                                       "N = 1M mixture at K = 40.")] = False,
    out: Annotated[str, Opt(help="Folder for the JSON rows (one file per run).")] = "bench/results",
    threads: Annotated[int | None, Opt(help="CPU threads for torch and the extension (default: torch's).")] = None,
) -> None:
    """Time each fused op (forward, backward, both) on every backend after checking it against the reference;
    print a table and write the rows as JSON."""
    import torch

    from cmvae_engine.bench import kernels as bench

    console = Console(width=max(Console().width, 140))  # the table needs ~140 columns; files get them too
    op_names = _pick(ops, bench.OPS, "--ops")
    backend_names = _pick(backends, bench.BACKENDS, "--backends")
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    if dev.type == "cuda" and not torch.cuda.is_available():
        console.print(f"[red]error:[/] --device {device}: CUDA is not available on this machine; use --device cpu")
        raise typer.Exit(2)
    if threads is not None:
        try:
            check_flags(("--threads", threads, THREADS, 2))
        except ValueError as e:
            console.print(Text(f"error: {e}", style="red"))
            raise typer.Exit(2) from None
        torch.set_num_threads(threads)
    if tiny and training:
        console.print("[red]error:[/] --tiny and --training choose different shape sets; pass one")
        raise typer.Exit(2)
    quick = quick if quick is not None else dev.type == "cpu"
    preset = "tiny" if tiny else "training" if training else ("quick" if quick else "full")
    cases = bench.select_cases(preset, op_names)
    console.print(f"[bold]bench kernels[/] {preset}: {len(cases)} shapes x {len(backend_names)} backends on "
                  f"{bench.device_name(dev)}")
    with console.status("measuring") as status:
        result = bench.run(cases, backend_names, dev, out, progress=lambda msg: status.update(f"measuring {msg}"))
    _print_table(console, result.rows)
    console.print(f"rows: {result.path}")


def _print_table(console: Console, rows: list[dict]) -> None:
    """Measured rows in full; a skipped backend as one row per shape, its reason once below the table."""
    first = rows[0] if rows else {}
    table = Table(title=f"{first.get('device')} | copy peak {_fmt(first.get('peak_gbps'), '.1f')} GB/s | torch "
                        f"{first.get('torch')} | triton {first.get('triton')} | {first.get('commit', '')[:10]}")
    for col in ("op", "shape", "mode", "backend", "median ms", "p20-p80 ms", "GB/s", "% peak", "x eager", "peak MB"):
        table.add_column(col, justify="left" if col in ("op", "shape", "mode", "backend") else "right")
    reasons: list[str] = []
    for r in rows:
        shape = "x".join(str(v) for v in r["shape"].values())
        if r["skipped"]:
            if r["mode"] == "fwd":
                if r["skipped"] not in reasons:
                    reasons.append(r["skipped"])
                table.add_row(r["op"], shape, "all", r["backend"], f"skipped [{reasons.index(r['skipped']) + 1}]",
                              *[""] * 5)
            continue
        pct = 100 * r["gbps"] / r["peak_gbps"]
        table.add_row(r["op"], shape, r["mode"], r["backend"], _fmt(r["median_ms"], ".3f"),
                      f"{_fmt(r['p20_ms'], '.3f')}-{_fmt(r['p80_ms'], '.3f')}", _fmt(r["gbps"], ".2f"),
                      _fmt(pct, ".1f"), _fmt(r.get("speedup_vs_eager"), ".2f"), _fmt(r["peak_mem_mb"], ".1f"))
    console.print(table)
    console.print("shapes: mixture_logpdf NxKxD, moe_logq MxSxBxD, importance_weights MxSxB, image_loglik RxBxP; "
                  f"fp32; peak memory: {first.get('peak_mem_method')}")
    for i, reason in enumerate(reasons, 1):
        console.print(f"[{i}] {reason}")
