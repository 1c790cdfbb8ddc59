#!/usr/bin/env python3
"""Build the C++/CUDA extension of the fused ops into kernels/_build/ (CMake, with Ninja when present).

    .venv/bin/python tools/build_extension.py             incremental build; prints one line
    .venv/bin/python tools/build_extension.py --clean     rebuild from scratch
    .venv/bin/python tools/build_extension.py --cuda on --cuda-arch "80;90"
    .venv/bin/python tools/build_extension.py --cuda-check compile the .cu files with nvcc (CPU-only torch)

Exits 0 even when the extension cannot be built (the ops then run on the torch backend) unless --strict.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
# Loaded by path (it imports only torch): importing the `cmvae_engine.kernels` package would pick a kernel backend
# (and log that the extension is missing) before it is built, and this script must work before the install too.
_spec = importlib.util.spec_from_file_location("cmvae_engine.kernels.extension_build",
                                               _ROOT / "kernels" / "extension_build.py")
extension_build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(extension_build)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clean", action="store_true", help="delete the build folder's contents first")
    p.add_argument("--cuda", choices=extension_build.CUDA_MODES, default="auto",
                   help="CUDA kernels: auto (when torch has CUDA and nvcc is found), on (required), off")
    p.add_argument("--cuda-arch", default="90",
                   help='CUDA architectures, CMake style (default 90 = H100/H200; e.g. "80;90")')
    p.add_argument("--cuda-check", action="store_true",
                   help="instead of the library, compile the .cu files to an unlinked object with nvcc, against "
                        "this torch's headers (catches compile errors where torch has no CUDA)")
    p.add_argument("--strict", action="store_true", help="exit 1 when the build fails")
    p.add_argument("--verbose", action="store_true", help="show the CMake and compiler output")
    args = p.parse_args(argv)

    t0 = time.perf_counter()
    try:
        if args.cuda_check:
            where = extension_build.check_cuda_sources(verbose=args.verbose, cuda_arch=args.cuda_arch)
            print(f"C++ extension: the CUDA sources compile with nvcc (arch {args.cuda_arch}; objects in {where}, "
                  f"{time.perf_counter() - t0:.0f} s)")
            return 0
        path = extension_build.build_library(verbose=args.verbose, cuda=args.cuda, cuda_arch=args.cuda_arch,
                                             clean=args.clean)
    except extension_build.BuildError as e:
        rerun = " ".join(["details:", Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:]),
                          "--verbose"])
        if args.cuda_check:
            print(f"C++ extension: CUDA source check failed: {e} ({rerun})", file=sys.stderr)
        else:
            print(f"C++ extension not built: {e}. The ops use the torch backend instead (slower on CPU); {rerun}",
                  file=sys.stderr)
        return 1 if args.strict else 0
    kinds = extension_build.built_kinds()
    print(f"C++ extension built: {path} ({kinds}; {time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
