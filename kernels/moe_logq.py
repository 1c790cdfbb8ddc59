"""Mixture-of-experts posterior density: log q(z|X) = logmeanexp_m' sum_d log q_m'(z_d | loc, scale).

z [M, S, B, D] holds the samples drawn from each source modality's expert; every sample is scored under
all M experts of its datapoint. For DReG the caller passes detached loc/scale.

The fused op `cmvae::moe_logq` never materialises the [M, M', S, B, D] broadcast of the reference. A Triton
program owns a block of datapoints b, keeps their experts' loc/scale [BLOCK_B, E, D] in registers and walks
the (m, s) samples; the backward saves only the output [M, S, B] and recomputes the responsibilities.
"""

from __future__ import annotations

import math

import torch

from cmvae_engine.kernels import backends
from cmvae_engine.kernels._triton import INTERPRETING, jit, next_pow2, row_block, tl, triton
from cmvae_engine.kernels.densities import Family, check_family, log_prob

# Elements of the [BLOCK_B, BLOCK_E, BLOCK_D] tile; the backward keeps five of them live. The interpreter
# runs tile operations as numpy calls and gets larger tiles (see kernels/mixture_logpdf.py).
_TILE = 65536 if INTERPRETING else 2048


# ----- Triton kernels ---------------------------------------------------------------------------------
@jit
def _experts_tile(b0, B, D, E: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_E: tl.constexpr,
                  BLOCK_D: tl.constexpr):
    """Offsets [BLOCK_B, BLOCK_E, BLOCK_D] of loc/scale[e, b, d] for datapoints b0..b0+BLOCK_B, their mask,
    and the index vectors and masks of b, e, d."""
    offs_b = b0 + tl.arange(0, BLOCK_B)
    offs_e = tl.arange(0, BLOCK_E)
    offs_d = tl.arange(0, BLOCK_D)
    b_mask = offs_b < B
    e_mask = offs_e < E
    d_mask = offs_d < D
    ebd = offs_e[None, :, None] * B * D + offs_b[:, None, None] * D + offs_d[None, None, :]
    mask = b_mask[:, None, None] & e_mask[None, :, None] & d_mask[None, None, :]
    return ebd, mask, offs_b, b_mask, e_mask, offs_d, d_mask


@jit
def _expert_logq(z, mu, inv_s, log_norm, e_mask, IS_LAPLACE: tl.constexpr):
    """lq[b, e] = -log_norm[b, e] - sum_d dist(z_bd, mu_ebd, s_ebd); experts past E get -inf."""
    diff = z[:, None, :] - mu
    if IS_LAPLACE:
        dist = tl.sum(tl.abs(diff) * inv_s, axis=2)
    else:
        u = diff * inv_s
        dist = 0.5 * tl.sum(u * u, axis=2)
    return tl.where(e_mask[None, :], -log_norm - dist, float("-inf")), diff


@jit
def _load_experts(loc_ptr, scale_ptr, acc_ptr, ebd, mask, IS_LAPLACE: tl.constexpr):
    """mu, 1/s [BLOCK_B, BLOCK_E, BLOCK_D] in acc_ptr's dtype and the log-normalisers sum_d (log s + c)
    [BLOCK_B, BLOCK_E] (padded lanes: mu = 0, s = 1, no normaliser)."""
    ACC = acc_ptr.dtype.element_ty
    mu = tl.load(loc_ptr + ebd, mask=mask, other=0.0).to(ACC)
    s = tl.load(scale_ptr + ebd, mask=mask, other=1.0).to(ACC)
    if IS_LAPLACE:
        log_norm = tl.sum(tl.where(mask, tl.log(s) + 0.6931471805599453, 0.0), axis=2)
    else:
        log_norm = tl.sum(tl.where(mask, tl.log(s) + 0.9189385332046727, 0.0), axis=2)
    return mu, 1.0 / s, log_norm


@jit
def _moe_fwd_kernel(z_ptr, loc_ptr, scale_ptr, out_ptr, B, D, E: tl.constexpr, IS_LAPLACE: tl.constexpr,
                    BLOCK_B: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program (b tile, sample ms = m * S + s): out[ms, b] = logsumexp_e lq[ms, b, e] - log E with
    lq = sum_d lp(z[ms, b, d] | loc[e, b, d], scale[e, b, d])."""
    ACC = out_ptr.dtype.element_ty
    b0 = tl.program_id(0).to(tl.int64) * BLOCK_B
    ms = tl.program_id(1).to(tl.int64)
    ebd, mask, offs_b, b_mask, e_mask, offs_d, d_mask = _experts_tile(b0, B, D, E, BLOCK_B, BLOCK_E,
                                                                     BLOCK_D)
    mu, inv_s, log_norm = _load_experts(loc_ptr, scale_ptr, out_ptr, ebd, mask, IS_LAPLACE)
    bd = offs_b[:, None] * D + offs_d[None, :]
    bd_mask = b_mask[:, None] & d_mask[None, :]
    z = tl.load(z_ptr + ms * B * D + bd, mask=bd_mask, other=0.0).to(ACC)
    lq, _ = _expert_logq(z, mu, inv_s, log_norm, e_mask, IS_LAPLACE)
    mx = tl.max(lq, axis=1)
    out = mx + tl.log(tl.sum(tl.exp(lq - mx[:, None]), axis=1)) - tl.log(tl.zeros([BLOCK_B], ACC) + E)
    tl.store(out_ptr + ms * B + offs_b, out, mask=b_mask)


@jit
def _moe_bwd_kernel(g_ptr, z_ptr, loc_ptr, scale_ptr, out_ptr, gz_ptr, part_loc_ptr, part_scale_ptr, B, D, MS,
                    N_SPLITS, E: tl.constexpr, IS_LAPLACE: tl.constexpr, BLOCK_B: tl.constexpr,
                    BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr, PARAMS: tl.constexpr):
    """Program (b tile, split p) walks samples ms = p, p + N_SPLITS, ... with
    r[ms, b, e] = exp(lq - log E - out) and w = g r:
      g_z[ms, b, d] = sum_e w dlp/dz                      (written per sample),
      g_loc[e, b, d] = sum_ms w dlp/dmu, g_scale likewise (partials [N_SPLITS, E, B, D], summed by the launcher);
    Laplace dlp/dz = -sign(z - mu)/s, dlp/ds = -1/s + |z - mu|/s^2; Normal dlp/dz = -(z - mu)/s^2,
    dlp/ds = -1/s + (z - mu)^2/s^3; dlp/dmu = -dlp/dz. PARAMS=False (detached experts, DReG) skips the
    parameter accumulators and their stores."""
    ACC = gz_ptr.dtype.element_ty
    b0 = tl.program_id(0).to(tl.int64) * BLOCK_B
    split = tl.program_id(1).to(tl.int64)
    ebd, mask, offs_b, b_mask, e_mask, offs_d, d_mask = _experts_tile(b0, B, D, E, BLOCK_B, BLOCK_E,
                                                                     BLOCK_D)
    mu, inv_s, log_norm = _load_experts(loc_ptr, scale_ptr, gz_ptr, ebd, mask, IS_LAPLACE)
    log_e = tl.log(tl.zeros([BLOCK_B], ACC) + E)
    bd = offs_b[:, None] * D + offs_d[None, :]
    bd_mask = b_mask[:, None] & d_mask[None, :]
    acc_a = tl.zeros([BLOCK_B, BLOCK_E, BLOCK_D], ACC)
    acc_b = tl.zeros([BLOCK_B, BLOCK_E, BLOCK_D], ACC)
    acc_w = tl.zeros([BLOCK_B, BLOCK_E], ACC)
    for ms in range(split, MS, N_SPLITS):
        z = tl.load(z_ptr + ms * B * D + bd, mask=bd_mask, other=0.0).to(ACC)
        g = tl.load(g_ptr + ms * B + offs_b, mask=b_mask, other=0.0).to(ACC)
        out = tl.load(out_ptr + ms * B + offs_b, mask=b_mask, other=float("inf")).to(ACC)
        lq, diff = _expert_logq(z, mu, inv_s, log_norm, e_mask, IS_LAPLACE)
        w = g[:, None] * tl.exp(lq - (log_e + out)[:, None])
        w3 = w[:, :, None]
        acc_w += w
        if IS_LAPLACE:
            sign = tl.where(diff > 0, 1.0, tl.where(diff < 0, -1.0, 0.0))
            gz = -tl.sum(w3 * sign * inv_s, axis=1)
            if PARAMS:
                acc_a += w3 * sign
                acc_b += w3 * tl.abs(diff)
        else:
            gz = -tl.sum(w3 * diff * inv_s * inv_s, axis=1)
            if PARAMS:
                acc_a += w3 * diff
                acc_b += w3 * diff * diff
        tl.store(gz_ptr + ms * B * D + bd, gz, mask=bd_mask)
    if not PARAMS:
        return
    if IS_LAPLACE:
        g_loc = acc_a * inv_s
        g_scale = acc_b * inv_s * inv_s - acc_w[:, :, None] * inv_s
    else:
        g_loc = acc_a * inv_s * inv_s
        g_scale = acc_b * inv_s * inv_s * inv_s - acc_w[:, :, None] * inv_s
    tl.store(part_loc_ptr + split * E * B * D + ebd, g_loc, mask=mask)
    tl.store(part_scale_ptr + split * E * B * D + ebd, g_scale, mask=mask)


# ----- launchers (the triton backend) ---------------------------------------------------------------------
def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _blocks(b: int, e: int, d: int) -> tuple[int, int, int]:
    block_e, block_d = next_pow2(e), next_pow2(d)
    if block_e * block_d > _TILE:
        raise ValueError(f"moe_logq: the triton backend keeps E x D = {e} x {d} per datapoint in registers; "
                         f"that exceeds {_TILE} values")
    return row_block(_TILE, block_e, block_d, cap=min(64, next_pow2(b))), block_e, block_d


def _triton_fwd(z: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor, is_laplace: bool) -> torch.Tensor:
    m, s, b, d = z.shape
    e = loc.shape[0]
    out = torch.empty((m, s, b), dtype=_acc_dtype(z.dtype), device=z.device)
    if out.numel() == 0:
        return out
    block_b, block_e, block_d = _blocks(b, e, d)
    _moe_fwd_kernel[(triton.cdiv(b, block_b), m * s)](
        z, loc, scale, out, b, d, E=e, IS_LAPLACE=is_laplace, BLOCK_B=block_b, BLOCK_E=block_e, BLOCK_D=block_d,
        num_warps=4)
    return out


def _triton_bwd(grad_out: torch.Tensor, z: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor,
                out: torch.Tensor, is_laplace: bool, need_params: bool = True
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    m, s, b, d = z.shape
    e = loc.shape[0]
    acc = _acc_dtype(z.dtype)
    g_z = torch.empty(z.shape, dtype=acc, device=z.device)
    block_b, block_e, block_d = _blocks(b, e, d)
    b_tiles = triton.cdiv(b, block_b)
    # Splitting the samples over programs fills a GPU at training shapes (B=128 gives only 8-16 b tiles);
    # the interpreter runs programs in turn and gains nothing from splits.
    target = 4 * torch.cuda.get_device_properties(z.device).multi_processor_count if z.is_cuda else 1
    splits = max(1, min(m * s, target // max(b_tiles, 1))) if need_params else 1
    # Without parameter gradients the kernel never touches the partials: one-element placeholders.
    part_shape = (splits, e, b, d) if need_params else (1,)
    part_loc = torch.zeros(part_shape, dtype=acc, device=z.device)
    part_scale = torch.zeros_like(part_loc)
    if g_z.numel() > 0:
        _moe_bwd_kernel[(b_tiles, splits)](
            grad_out, z, loc, scale, out, g_z, part_loc, part_scale, b, d, m * s, splits, E=e,
            IS_LAPLACE=is_laplace, BLOCK_B=block_b, BLOCK_E=block_e, BLOCK_D=block_d, PARAMS=need_params,
            num_warps=4)
    if not need_params:
        return g_z, z.new_empty(0, dtype=acc), z.new_empty(0, dtype=acc)
    return g_z, part_loc.sum(0), part_scale.sum(0)


# ----- the torch backend of the op: the contract's formulas in plain torch ---------------------------------
def _torch_fwd(z: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor, is_laplace: bool) -> torch.Tensor:
    acc = _acc_dtype(z.dtype)
    return moe_logq_ref(z.to(acc), loc.to(acc), scale.to(acc), "laplace" if is_laplace else "normal")


def _torch_bwd(grad_out: torch.Tensor, z: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor,
               out: torch.Tensor, is_laplace: bool, need_params: bool = True
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    acc = _acc_dtype(z.dtype)
    z, loc, scale, g, out = (t.to(acc) for t in (z, loc, scale, grad_out, out))
    fam: Family = "laplace" if is_laplace else "normal"
    n_experts = loc.shape[0]
    diff = z[:, None] - loc[None, :, None]                                                 # [M, E, S, B, D]
    lq = log_prob(z[:, None], loc[None, :, None], scale[None, :, None], fam).sum(-1)     # [M, E, S, B]
    w = (g[:, None] * (lq - math.log(n_experts) - out[:, None]).exp())[..., None]
    s = scale[None, :, None]
    dmu = diff.sign() / s if is_laplace else diff / s**2
    if not need_params:  # two distinct empties: a custom op's outputs may not alias one another
        return -(w * dmu).sum(1), z.new_empty(0), z.new_empty(0)
    ds = -1.0 / s + (diff.abs() / s**2 if is_laplace else diff**2 / s**3)
    return -(w * dmu).sum(1), (w * dmu).sum((0, 2)), (w * ds).sum((0, 2))


_IMPLS = {"torch": (_torch_fwd, _torch_bwd), "triton": (_triton_fwd, _triton_bwd)}


# ----- the op and its autograd ------------------------------------------------------------------------------
@torch.library.custom_op("cmvae::moe_logq", mutates_args=())
def moe_logq_op(z: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor, is_laplace: bool,
                backend: str) -> torch.Tensor:
    """log q(z|X) [M, S, B] for z [M, S, B, D] and expert parameters loc/scale [E, B, D]."""
    return backends.lookup("moe_logq", backend, "fwd", _IMPLS)(z, loc, scale, is_laplace)


@moe_logq_op.register_fake
def _(z, loc, scale, is_laplace, backend):
    return z.new_empty(z.shape[:-1], dtype=_acc_dtype(z.dtype))


@torch.library.custom_op("cmvae::moe_logq_backward", mutates_args=())
def moe_logq_backward_op(grad_out: torch.Tensor, z: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor,
                         out: torch.Tensor, is_laplace: bool, backend: str, need_params: bool = True,
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(g_z, g_loc, g_scale) in the accumulation dtype (fp32, or fp64 for fp64 inputs). need_params=False
    (detached experts, as DReG's) skips the reductions over samples: g_loc and g_scale come back empty [0]."""
    bwd = backends.lookup("moe_logq", backend, "bwd", _IMPLS)
    return bwd(grad_out, z, loc, scale, out, is_laplace, need_params)


@moe_logq_backward_op.register_fake
def _(grad_out, z, loc, scale, out, is_laplace, backend, need_params=True):
    acc = _acc_dtype(z.dtype)
    shape = loc.shape if need_params else (0,)
    return z.new_empty(z.shape, dtype=acc), loc.new_empty(shape, dtype=acc), scale.new_empty(shape, dtype=acc)


def _setup_context(ctx, inputs, output):
    z, loc, scale, is_laplace, backend = inputs
    ctx.save_for_backward(z, loc, scale, output)
    ctx.is_laplace, ctx.backend = is_laplace, backend


def _backward(ctx, grad_out):
    z, loc, scale, out = ctx.saved_tensors
    need = ctx.needs_input_grad[:3]
    grads = moe_logq_backward_op(grad_out.contiguous(), z, loc, scale, out, ctx.is_laplace, ctx.backend,
                                 need[1] or need[2])
    # g_z is a by-product of the walk over experts and always computed; the parameter reductions only on demand.
    return (*(g.to(t.dtype) if n else None for g, t, n in zip(grads, (z, loc, scale), need, strict=True)),
            None, None)


moe_logq_op.register_autograd(_backward, setup_context=_setup_context)


def moe_logq_fused(z: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor, family: Family,
                   backend: str) -> torch.Tensor:
    """The op with the reference's signature: inputs promoted to one dtype (bf16/fp16 -> fp32), contiguous."""
    dtype = _acc_dtype(torch.promote_types(torch.promote_types(z.dtype, loc.dtype), scale.dtype))
    z, loc, scale = (t.to(dtype).contiguous() for t in (z, loc, scale))
    return moe_logq_op(z, loc, scale, check_family(family) == "laplace", backend)


# ----- plain-torch reference ----------------------------------------------------------------------------
def moe_logq_ref(z: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor, family: Family) -> torch.Tensor:
    """Plain-torch reference. z [M, S, B, D], loc/scale [M', B, D] -> [M, S, B]."""
    n_experts = loc.shape[0]
    # [M, 1, S, B, D] against [1, M', 1, B, D] -> [M, M', S, B]
    lq = log_prob(z[:, None], loc[None, :, None], scale[None, :, None], family).sum(-1)
    return torch.logsumexp(lq, dim=1) - math.log(n_experts)
