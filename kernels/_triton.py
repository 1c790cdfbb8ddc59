"""Triton, when installed: the kernel modules import `triton`, `tl` and `jit` from here.

Without Triton (a CPU install without the `gpu` or `dev` extra) `jit` leaves the kernel functions as plain,
never-called Python functions, so the modules still import and the triton backend reports itself unavailable.
The kernel modules use `from __future__ import annotations`, so `tl.constexpr` annotations are never evaluated.

TRITON_INTERPRET=1 must be set before the `@triton.jit` definitions run (Triton reads it at decoration time);
`INTERPRETING` records the value those definitions saw, which is what decides whether CPU tensors can be used.
"""

from __future__ import annotations

import os

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None
    tl = None

HAS_TRITON = triton is not None
INTERPRETING = HAS_TRITON and os.environ.get("TRITON_INTERPRET", "0") == "1"


def jit(fn):
    return triton.jit(fn) if HAS_TRITON else fn


def next_pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def row_block(budget: int, *inner: int, cap: int = 64) -> int:
    """Largest power of two <= cap such that it times the inner tile sizes stays within `budget` elements
    (a [BLOCK_N, BLOCK_K, BLOCK_D] tile of 4096 fp32 values is 32 registers per thread at 4 warps)."""
    size = 1
    for n in inner:
        size *= n
    block = 1
    while block * 2 <= cap and block * 2 * size <= budget:
        block *= 2
    return block
