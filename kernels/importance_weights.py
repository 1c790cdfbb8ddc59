"""IWAE bound and importance weights from log-weights lw [M, S, B] (S importance samples).

bound[b] = mean_m (logsumexp_s lw[m, s, b] - log S); weights = softmax over s; the DReG path-gradient
factor is the squared normalised weight.

The fused op `cmvae::importance_weights` produces all three in one pass over lw (two reads of each column
of S values, one write of each output); its backward is g_lw = grad_bound[b] * weights / M.
"""

from __future__ import annotations

import math

import torch

from cmvae_engine.kernels import backends
from cmvae_engine.kernels._triton import INTERPRETING, jit, next_pow2, row_block, tl, triton

# Elements of one [BLOCK_S, BLOCK_B] tile of lw (b is the contiguous axis); larger under the interpreter.
_TILE = 65536 if INTERPRETING else 4096


# ----- Triton kernels ---------------------------------------------------------------------------------
@jit
def _load_samples(lw_ptr, offs, s_mask, b_mask, acc_ptr):
    """A [BLOCK_S, BLOCK_B] tile of lw in acc_ptr's dtype: padded samples are -inf (no weight), padded datapoints 0 (so
    that their unused logsumexp stays finite instead of computing -inf - -inf)."""
    x = tl.load(lw_ptr + offs, mask=s_mask[:, None] & b_mask[None, :], other=0.0).to(acc_ptr.dtype.element_ty)
    return tl.where(s_mask[:, None], x, float("-inf"))


@jit
def _iw_fwd_kernel(lw_ptr, bound_ptr, w_ptr, sq_ptr, M, S, B, BLOCK_S: tl.constexpr, BLOCK_B: tl.constexpr):
    """Program (b tile): for each m, lse = logsumexp_s lw[m, s, b] = max + log(sum) by an online max/rescale
    over s tiles, then weights = exp(lw - max) / sum and their squares; bound[b] = mean_m lse - log S."""
    ACC = bound_ptr.dtype.element_ty
    offs_b = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    b_mask = offs_b < B
    total = tl.zeros([BLOCK_B], ACC)
    for m in range(0, M):
        base = m * S * B  # lw holds far fewer than 2**31 values: int32 is enough
        m_i = tl.full([BLOCK_B], float("-inf"), ACC)
        l_i = tl.zeros([BLOCK_B], ACC)
        for s0 in range(0, S, BLOCK_S):
            offs_s = s0 + tl.arange(0, BLOCK_S)
            x = _load_samples(lw_ptr, base + offs_s[:, None] * B + offs_b[None, :], offs_s < S, b_mask, bound_ptr)
            m_new = tl.maximum(m_i, tl.max(x, axis=0))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            l_i = l_i * tl.exp(m_i - m_safe) + tl.sum(tl.exp(x - m_safe[None, :]), axis=0)
            m_i = m_new
        m_safe = tl.where(m_i == float("-inf"), 0.0, m_i)
        total += m_safe + tl.log(l_i)
        # exp(lw - max) / sum as softmax does: exp(lw - lse) would lose ~ulp(|lw|) relative accuracy to the
        # subtraction of two large log-weights (1e-4 at |lw| ~ 1e3 in fp32).
        inv_l = 1.0 / l_i
        for s0 in range(0, S, BLOCK_S):
            offs_s = s0 + tl.arange(0, BLOCK_S)
            offs = base + offs_s[:, None] * B + offs_b[None, :]
            mask = (offs_s < S)[:, None] & b_mask[None, :]
            w = tl.exp(_load_samples(lw_ptr, offs, offs_s < S, b_mask, bound_ptr) - m_safe[None, :]) * inv_l[None, :]
            tl.store(w_ptr + offs, w, mask=mask)
            tl.store(sq_ptr + offs, w * w, mask=mask)
    bound = total / (tl.zeros([BLOCK_B], ACC) + M) - tl.log(tl.zeros([BLOCK_B], ACC) + S)
    tl.store(bound_ptr + offs_b, bound, mask=b_mask)


@jit
def _iw_bwd_kernel(g_ptr, w_ptr, glw_ptr, M, B, numel, BLOCK: tl.constexpr):
    """g_lw[m, s, b] = grad_bound[b] * weights[m, s, b] / M."""
    ACC = glw_ptr.dtype.element_ty
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    g = tl.load(g_ptr + offs % B, mask=mask, other=0.0).to(ACC)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(ACC)
    tl.store(glw_ptr + offs, g * w / (tl.zeros([BLOCK], ACC) + M), mask=mask)


# ----- launchers (the triton backend) ---------------------------------------------------------------------
def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _triton_fwd(lw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    m, s, b = lw.shape
    acc = _acc_dtype(lw.dtype)
    bound = torch.empty(b, dtype=acc, device=lw.device)
    weights = torch.empty(lw.shape, dtype=acc, device=lw.device)
    sq = torch.empty_like(weights)
    if lw.numel() == 0:
        return bound.fill_(float("nan")), weights, sq
    block_b = min(next_pow2(b), 128)
    block_s = row_block(_TILE, block_b, cap=next_pow2(s))
    _iw_fwd_kernel[(triton.cdiv(b, block_b),)](lw, bound, weights, sq, m, s, b, BLOCK_S=block_s, BLOCK_B=block_b,
                                               num_warps=4)
    return bound, weights, sq


def _triton_bwd(grad_bound: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    m, _, b = weights.shape
    g_lw = torch.empty_like(weights)
    if weights.numel():
        block = 1024
        _iw_bwd_kernel[(triton.cdiv(weights.numel(), block),)](grad_bound, weights, g_lw, m, b, weights.numel(),
                                                               BLOCK=block, num_warps=4)
    return g_lw


# ----- the torch backend of the op -----------------------------------------------------------------------
def _torch_fwd(lw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return importance_weights_ref(lw.to(_acc_dtype(lw.dtype)))


def _torch_bwd(grad_bound: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return grad_bound * weights / weights.shape[0]


_IMPLS = {"torch": (_torch_fwd, _torch_bwd), "triton": (_triton_fwd, _triton_bwd)}


# ----- the op and its autograd ------------------------------------------------------------------------------
@torch.library.custom_op("cmvae::importance_weights", mutates_args=())
def importance_weights_op(lw: torch.Tensor, backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(bound [B], weights [M, S, B], squared weights [M, S, B]); only the bound is differentiable."""
    return backends.lookup("importance_weights", backend, "fwd", _IMPLS)(lw)


@importance_weights_op.register_fake
def _(lw, backend):
    acc = _acc_dtype(lw.dtype)
    return lw.new_empty(lw.shape[2:], dtype=acc), lw.new_empty(lw.shape, dtype=acc), lw.new_empty(lw.shape, dtype=acc)


@torch.library.custom_op("cmvae::importance_weights_backward", mutates_args=())
def importance_weights_backward_op(grad_bound: torch.Tensor, weights: torch.Tensor, backend: str) -> torch.Tensor:
    return backends.lookup("importance_weights", backend, "bwd", _IMPLS)(grad_bound, weights)


@importance_weights_backward_op.register_fake
def _(grad_bound, weights, backend):
    return torch.empty_like(weights)


def _setup_context(ctx, inputs, output):
    _, backend = inputs
    _, weights, sq = output
    ctx.mark_non_differentiable(weights, sq)
    ctx.save_for_backward(weights)
    ctx.backend, ctx.lw_dtype = backend, inputs[0].dtype


def _backward(ctx, grad_bound, _grad_w, _grad_sq):
    (weights,) = ctx.saved_tensors
    g = importance_weights_backward_op(grad_bound.to(weights.dtype).contiguous(), weights, ctx.backend)
    return g.to(ctx.lw_dtype), None


importance_weights_op.register_autograd(_backward, setup_context=_setup_context)


def importance_weights_fused(lw: torch.Tensor, backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The op with the reference's signature (bf16/fp16 lw computed in fp32)."""
    return importance_weights_op(lw.to(_acc_dtype(lw.dtype)).contiguous(), backend)


# ----- plain-torch reference ----------------------------------------------------------------------------
def importance_weights_ref(lw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plain-torch reference -> (bound [B], weights [M, S, B], squared weights [M, S, B]).

    Only the bound carries a gradient; the weights are detached, as the estimators use them.
    """
    n_samples = lw.shape[1]
    bound = (torch.logsumexp(lw, dim=1) - math.log(n_samples)).mean(0)
    weights = torch.softmax(lw.detach(), dim=1)
    return bound, weights, weights * weights
