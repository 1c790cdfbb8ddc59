#!/usr/bin/env python3
"""CPU speed of the C++ extension's mixture_logpdf against eager torch (the reference), forward + backward.

    .venv/bin/python tools/extension_speed.py [--n 65536 --k 40 --d 32 --runs 20 --threads 2 --family laplace]

Checks the extension against the reference first, then times each side `--runs` times (after one warm-up) and
prints the medians and their ratio. Wall-clock time: on a shared machine the figures move with the load.
The full benchmark of every op and backend is `cmvae-engine bench kernels`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from cmvae_engine.engine.run_info import cpu_name  # noqa: E402
from cmvae_engine.kernels import extension  # noqa: E402
from cmvae_engine.kernels.mixture_logpdf import mixture_logpdf_ref  # noqa: E402


def _median_ms(fn, runs: int) -> float:
    fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=65536)
    p.add_argument("--k", type=int, default=40)
    p.add_argument("--d", type=int, default=32)
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--family", choices=("laplace", "normal"), default="laplace")
    args = p.parse_args()
    if not extension.available():
        print(f"the C++ extension is unavailable: {extension.unavailable_reason()}", file=sys.stderr)
        return 1
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(args.n, args.d, generator=g)
    loc = torch.rand(args.k, args.d, generator=g) * 2 - 1
    scale = torch.rand(args.k, args.d, generator=g) + 0.5
    log_pi = torch.log_softmax(torch.randn(args.k, generator=g), 0)
    grad = torch.ones(args.n)
    lap = args.family == "laplace"

    def eager() -> tuple[torch.Tensor, ...]:
        leaves = [t.detach().requires_grad_() for t in (z, loc, scale, log_pi)]
        logp = mixture_logpdf_ref(*leaves, args.family)[0]
        return (logp.detach(), *torch.autograd.grad(logp, leaves, grad))

    def ext() -> tuple[torch.Tensor, ...]:
        logp = extension.mixture_logpdf_fwd(z, loc, scale, log_pi, lap, False)[0]
        return (logp, *extension.mixture_logpdf_bwd(grad, z, loc, scale, log_pi, logp, lap))

    for name, ours, ref in zip(("logp", "g_z", "g_loc", "g_scale", "g_log_pi"), ext(), eager(), strict=True):
        torch.testing.assert_close(ours, ref, rtol=1e-3, atol=1e-3 * (1 + ref.abs().max().item()), msg=name)
    t_eager = _median_ms(eager, args.runs)
    t_ext = _median_ms(ext, args.runs)
    print(f"mixture_logpdf fwd+bwd {args.family} N={args.n} K={args.k} D={args.d} float32, {cpu_name()}, "
          f"{torch.get_num_threads()} threads of {os.cpu_count()} cores, torch {torch.__version__}, "
          f"median of {args.runs}: eager {t_eager:.1f} ms, extension {t_ext:.1f} ms, {t_eager / t_ext:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
