"""Mixture-prior log-density: log p(z) = logsumexp_c (log pi_c + sum_d log F(z_d | mu_cd, s_cd)).

By the identity sum_c p(c|z)(log pi_c + log p(z|c) - log p(c|z)) = log p(z) (value and gradient), this
one logsumexp is the whole cluster term of the CMVAE objective. Optionally also returns the
responsibilities p(c|z) and their entropy in nats (callers normalise it by log K as they need).
Pruned clusters carry log_pi = -inf and get exactly zero responsibility.

The fused op `cmvae::mixture_logpdf` never materialises the [N, K, D] broadcast of the reference: the Triton
kernels keep a [BLOCK_N, BLOCK_K, D] tile in registers with an online logsumexp over cluster tiles, and the
backward recomputes the joint densities from the saved log p(z) [N] alone.
"""

from __future__ import annotations

import math

import torch

from cmvae_engine.kernels import backends
from cmvae_engine.kernels._triton import INTERPRETING, jit, next_pow2, row_block, tl, triton
from cmvae_engine.kernels.densities import Family, check_family, log_prob

_LOG_2 = math.log(2.0)
_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)
# Elements of the [BLOCK_N, BLOCK_K, BLOCK_D] tile: 4096 fits registers on a GPU (kernels._triton.row_block);
# the interpreter runs each tile operation as one numpy call, so it gets 16x larger tiles (an odd-shaped
# 123 x 37 x 33 fwd+bwd took 6.5 s with 4096).
_TILE = 65536 if INTERPRETING else 4096


# ----- Triton kernels ---------------------------------------------------------------------------------
@jit
def _component_tile(z, loc_ptr, scale_ptr, log_pi_ptr, k0, K, D, offs_d, d_mask,
                    IS_LAPLACE: tl.constexpr, BLOCK_K: tl.constexpr):
    """For z [BLOCK_N, BLOCK_D] and clusters k0..k0+BLOCK_K: joint [BLOCK_N, BLOCK_K] = log pi_k + sum_d lp,
    diff = z - mu [BLOCK_N, BLOCK_K, BLOCK_D] and 1/s [BLOCK_K, BLOCK_D]. Clusters past K get joint = -inf;
    padded d lanes load mu = 0, s = 1 and contribute 0."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    k_mask = offs_k < K
    kd = offs_k[:, None] * D + offs_d[None, :]
    kd_mask = k_mask[:, None] & d_mask[None, :]
    mu = tl.load(loc_ptr + kd, mask=kd_mask, other=0.0).to(z.dtype)
    s = tl.load(scale_ptr + kd, mask=kd_mask, other=1.0).to(z.dtype)
    log_pi = tl.load(log_pi_ptr + offs_k, mask=k_mask, other=float("-inf")).to(z.dtype)
    inv_s = 1.0 / s
    diff = z[:, None, :] - mu[None, :, :]
    if IS_LAPLACE:
        log_norm = tl.where(kd_mask, tl.log(s) + 0.6931471805599453, 0.0)
        dist = tl.sum(tl.abs(diff) * inv_s[None, :, :], axis=2)
    else:
        log_norm = tl.where(kd_mask, tl.log(s) + 0.9189385332046727, 0.0)
        u = diff * inv_s[None, :, :]
        dist = 0.5 * tl.sum(u * u, axis=2)
    joint = (log_pi - tl.sum(log_norm, axis=1))[None, :] - dist
    return joint, diff, inv_s


@jit
def _load_rows(z_ptr, pid, N, D, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rows pid * BLOCK_N ... of z [N, D] as stored (callers cast at once: bf16 must not be computed on in
    the interpreter), their indices and masks; padded lanes hold 0."""
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    z = tl.load(z_ptr + rows[:, None] * D + offs_d[None, :], mask=row_mask[:, None] & d_mask[None, :],
                other=0.0)
    return z, rows, row_mask, offs_d, d_mask


@jit
def _mixture_fwd_kernel(z_ptr, loc_ptr, scale_ptr, log_pi_ptr, logp_ptr, resp_ptr, ent_ptr, N, K, D,
                        IS_LAPLACE: tl.constexpr, WITH_POSTERIOR: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """logp[n] = logsumexp_k joint[n, k], joint = log pi_k + sum_d lp(z_nd | mu_kd, s_kd), by an online
    max/rescale over cluster tiles (stable for z far from every cluster; all-(-inf) tiles give no NaN).
    WITH_POSTERIOR: a second pass writes resp = exp(joint - logp) and entropy = -sum_k resp (joint - logp),
    with 0 log 0 = 0."""
    ACC = logp_ptr.dtype.element_ty
    pid = tl.program_id(0).to(tl.int64)
    z, rows, row_mask, offs_d, d_mask = _load_rows(z_ptr, pid, N, D, BLOCK_N, BLOCK_D)
    z = z.to(ACC)
    m_i = tl.full([BLOCK_N], float("-inf"), ACC)
    l_i = tl.zeros([BLOCK_N], ACC)
    for k0 in range(0, K, BLOCK_K):
        joint, _, _ = _component_tile(z, loc_ptr, scale_ptr, log_pi_ptr, k0, K, D, offs_d, d_mask,
                                      IS_LAPLACE, BLOCK_K)
        m_new = tl.maximum(m_i, tl.max(joint, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp(m_i - m_safe) + tl.sum(tl.exp(joint - m_safe[:, None]), axis=1)
        m_i = m_new
    logp = tl.where(m_i == float("-inf"), 0.0, m_i) + tl.log(l_i)
    tl.store(logp_ptr + rows, logp, mask=row_mask)
    if WITH_POSTERIOR:
        ent = tl.zeros([BLOCK_N], ACC)
        for k0 in range(0, K, BLOCK_K):
            joint, _, _ = _component_tile(z, loc_ptr, scale_ptr, log_pi_ptr, k0, K, D, offs_d, d_mask,
                                          IS_LAPLACE, BLOCK_K)
            log_r = joint - logp[:, None]
            r = tl.exp(log_r)
            ent -= tl.sum(r * tl.where(r > 0, log_r, 0.0), axis=1)
            offs_k = k0 + tl.arange(0, BLOCK_K)
            tl.store(resp_ptr + rows[:, None] * K + offs_k[None, :], r,
                     mask=row_mask[:, None] & (offs_k < K)[None, :])
        tl.store(ent_ptr + rows, ent, mask=row_mask)


@jit
def _weights_tile(z, g, logp, loc_ptr, scale_ptr, log_pi_ptr, k0, K, D, offs_d, d_mask,
                  IS_LAPLACE: tl.constexpr, BLOCK_K: tl.constexpr):
    """w[n, k] = g[n] r[n, k] with r = exp(joint - logp) recomputed, plus diff and 1/s of the tile.
    Padded rows carry g = 0 and logp = +inf, so r = 0 there (no inf * 0)."""
    joint, diff, inv_s = _component_tile(z, loc_ptr, scale_ptr, log_pi_ptr, k0, K, D, offs_d, d_mask,
                                         IS_LAPLACE, BLOCK_K)
    w = g[:, None] * tl.exp(joint - logp[:, None])
    return w, diff, inv_s


@jit
def _mixture_bwd_z_kernel(g_ptr, z_ptr, loc_ptr, scale_ptr, log_pi_ptr, logp_ptr, gz_ptr, N, K, D,
                          IS_LAPLACE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          BLOCK_D: tl.constexpr):
    """g_z[n, d] = g[n] sum_k r[n, k] dlp/dz, with dlp/dz = -sign(z - mu)/s (Laplace), -(z - mu)/s^2 (Normal)."""
    ACC = gz_ptr.dtype.element_ty
    pid = tl.program_id(0).to(tl.int64)
    z, rows, row_mask, offs_d, d_mask = _load_rows(z_ptr, pid, N, D, BLOCK_N, BLOCK_D)
    z = z.to(ACC)
    g = tl.load(g_ptr + rows, mask=row_mask, other=0.0).to(ACC)
    logp = tl.load(logp_ptr + rows, mask=row_mask, other=float("inf")).to(ACC)
    acc = tl.zeros([BLOCK_N, BLOCK_D], ACC)
    for k0 in range(0, K, BLOCK_K):
        w, diff, inv_s = _weights_tile(z, g, logp, loc_ptr, scale_ptr, log_pi_ptr, k0, K, D, offs_d, d_mask,
                                       IS_LAPLACE, BLOCK_K)
        if IS_LAPLACE:
            slope = tl.where(diff > 0, 1.0, tl.where(diff < 0, -1.0, 0.0)) * inv_s[None, :, :]
        else:
            slope = diff * (inv_s * inv_s)[None, :, :]
        acc -= tl.sum(w[:, :, None] * slope, axis=1)
    tl.store(gz_ptr + rows[:, None] * D + offs_d[None, :], acc, mask=row_mask[:, None] & d_mask[None, :])


@jit
def _mixture_bwd_param_kernel(g_ptr, z_ptr, loc_ptr, scale_ptr, log_pi_ptr, logp_ptr,
                              part_loc_ptr, part_scale_ptr, part_pi_ptr, N, K, D, N_SPLITS,
                              IS_LAPLACE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                              BLOCK_D: tl.constexpr):
    """Program (split p, cluster tile): sums over its row tiles p, p + N_SPLITS, ... of
    g_log_pi[k] = sum_n w[n, k];  g_loc[k, d] = sum_n w dlp/dmu;  g_scale[k, d] = sum_n w dlp/ds with
    Laplace dlp/dmu = sign(z - mu)/s, dlp/ds = -1/s + |z - mu|/s^2; Normal dlp/dmu = (z - mu)/s^2,
    dlp/ds = -1/s + (z - mu)^2/s^3. The 1/s factors are constant over n and applied once at the end.
    Writes fp32/fp64 partials [N_SPLITS, K, D] (and [N_SPLITS, K]) that the launcher sums: no atomics."""
    ACC = part_loc_ptr.dtype.element_ty
    split = tl.program_id(0).to(tl.int64)
    k0 = tl.program_id(1).to(tl.int64) * BLOCK_K
    acc_pi = tl.zeros([BLOCK_K], ACC)
    acc_a = tl.zeros([BLOCK_K, BLOCK_D], ACC)
    acc_b = tl.zeros([BLOCK_K, BLOCK_D], ACC)
    inv_s = tl.zeros([BLOCK_K, BLOCK_D], ACC)
    for tile in range(split, tl.cdiv(N, BLOCK_N), N_SPLITS):
        z, rows, row_mask, offs_d, d_mask = _load_rows(z_ptr, tile, N, D, BLOCK_N, BLOCK_D)
        z = z.to(ACC)
        g = tl.load(g_ptr + rows, mask=row_mask, other=0.0).to(ACC)
        logp = tl.load(logp_ptr + rows, mask=row_mask, other=float("inf")).to(ACC)
        w, diff, inv_s = _weights_tile(z, g, logp, loc_ptr, scale_ptr, log_pi_ptr, k0, K, D, offs_d, d_mask,
                                       IS_LAPLACE, BLOCK_K)
        acc_pi += tl.sum(w, axis=0)
        w3 = w[:, :, None]
        if IS_LAPLACE:
            acc_a += tl.sum(w3 * tl.where(diff > 0, 1.0, tl.where(diff < 0, -1.0, 0.0)), axis=0)
            acc_b += tl.sum(w3 * tl.abs(diff), axis=0)
        else:
            acc_a += tl.sum(w3 * diff, axis=0)
            acc_b += tl.sum(w3 * diff * diff, axis=0)
    if IS_LAPLACE:
        g_loc = acc_a * inv_s
        g_scale = acc_b * inv_s * inv_s - acc_pi[:, None] * inv_s
    else:
        g_loc = acc_a * inv_s * inv_s
        g_scale = acc_b * inv_s * inv_s * inv_s - acc_pi[:, None] * inv_s
    offs_k = k0 + tl.arange(0, BLOCK_K)
    offs_d = tl.arange(0, BLOCK_D)
    k_mask = offs_k < K
    kd_mask = k_mask[:, None] & (offs_d < D)[None, :]
    base = split * K * D + offs_k[:, None] * D + offs_d[None, :]
    tl.store(part_loc_ptr + base, g_loc, mask=kd_mask)
    tl.store(part_scale_ptr + base, g_scale, mask=kd_mask)
    tl.store(part_pi_ptr + split * K + offs_k, acc_pi, mask=k_mask)


# ----- launchers (the triton backend) ---------------------------------------------------------------------
def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Outputs and accumulation: fp64 stays fp64, everything else computes in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _blocks(n: int, k: int, d: int) -> tuple[int, int, int]:
    block_d = next_pow2(d)
    if block_d > _TILE:
        raise ValueError(f"mixture_logpdf: the triton backend keeps a whole row in registers; D={d} > {_TILE}")
    block_k = min(next_pow2(k), max(1, _TILE // (32 * block_d)))  # leaves 32 rows per tile
    block_n = row_block(_TILE, block_k, block_d, cap=min(64, next_pow2(n)))
    return block_n, block_k, block_d


def _n_programs(device: torch.device) -> int:
    """Programs that fill the device: 4 per SM on CUDA; 1 under the interpreter, where programs run in turn."""
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def _triton_fwd(z: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor, log_pi: torch.Tensor, is_laplace: bool,
                with_posterior: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    (n, d), k = z.shape, loc.shape[0]
    acc = _acc_dtype(z.dtype)
    logp = torch.empty(n, dtype=acc, device=z.device)
    resp = torch.empty((n, k) if with_posterior else (0,), dtype=acc, device=z.device)
    ent = torch.empty(n if with_posterior else 0, dtype=acc, device=z.device)
    if n == 0:
        return logp, resp, ent
    block_n, block_k, block_d = _blocks(n, k, d)
    _mixture_fwd_kernel[(triton.cdiv(n, block_n),)](
        z, loc, scale, log_pi, logp, resp, ent, n, k, d, IS_LAPLACE=is_laplace, WITH_POSTERIOR=with_posterior,
        BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_D=block_d, num_warps=4)
    return logp, resp, ent


def _triton_bwd(grad_logp: torch.Tensor, z: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor,
                log_pi: torch.Tensor, logp: torch.Tensor, is_laplace: bool, need_z: bool = True,
                need_params: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    (n, d), k = z.shape, loc.shape[0]
    acc = _acc_dtype(z.dtype)
    g_z = torch.empty((n, d) if need_z else (0,), dtype=acc, device=z.device)
    block_n, block_k, block_d = _blocks(n, k, d)
    n_tiles, k_tiles = triton.cdiv(n, block_n), triton.cdiv(k, block_k)
    splits = max(1, min(n_tiles, _n_programs(z.device) // k_tiles))
    parts = (torch.zeros((splits, k, d), dtype=acc, device=z.device),
             torch.zeros((splits, k, d), dtype=acc, device=z.device),
             torch.zeros((splits, k), dtype=acc, device=z.device)) if need_params else ()
    meta = dict(IS_LAPLACE=is_laplace, BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_D=block_d, num_warps=4)
    # Each kernel runs only when its gradients are wanted (DReG detaches the posterior, eval passes no z grad).
    if need_z and n > 0:
        _mixture_bwd_z_kernel[(n_tiles,)](grad_logp, z, loc, scale, log_pi, logp, g_z, n, k, d, **meta)
    if not need_params:  # distinct empties: a custom op's outputs may not alias one another
        return g_z, *(z.new_empty(0, dtype=acc) for _ in range(3))
    if n > 0:
        _mixture_bwd_param_kernel[(splits, k_tiles)](grad_logp, z, loc, scale, log_pi, logp, *parts, n, k, d,
                                                     splits, **meta)
    return (g_z, *(p.sum(0) for p in parts))


# ----- the torch backend of the op: the contract's formulas in plain torch ([N, K, D] intermediates) ---------
def _torch_fwd(z: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor, log_pi: torch.Tensor, is_laplace: bool,
               with_posterior: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    acc = _acc_dtype(z.dtype)
    fam: Family = "laplace" if is_laplace else "normal"
    logp, resp, ent = mixture_logpdf_ref(z.to(acc), loc.to(acc), scale.to(acc), log_pi.to(acc), fam, with_posterior)
    if not with_posterior:
        resp, ent = z.new_empty(0, dtype=acc), z.new_empty(0, dtype=acc)
    return logp, resp, ent


def _torch_bwd(grad_logp: torch.Tensor, z: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor,
               log_pi: torch.Tensor, logp: torch.Tensor, is_laplace: bool, need_z: bool = True,
               need_params: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    acc = _acc_dtype(z.dtype)
    z, loc, scale, log_pi, g = (t.to(acc) for t in (z, loc, scale, log_pi, grad_logp))
    fam: Family = "laplace" if is_laplace else "normal"
    w = g[:, None] * (component_logpdf_ref(z, loc, scale, log_pi, fam) - logp.to(acc)[:, None]).exp()  # [N, K]
    diff = z[:, None, :] - loc[None]                                                                     # [N, K, D]
    dmu = diff.sign() / scale if is_laplace else diff / scale**2
    w3 = w[:, :, None]
    g_z = -(w3 * dmu).sum(1) if need_z else z.new_empty(0)
    if not need_params:  # distinct empties: a custom op's outputs may not alias one another
        return g_z, z.new_empty(0), z.new_empty(0), z.new_empty(0)
    ds = -1.0 / scale + (diff.abs() / scale**2 if is_laplace else diff**2 / scale**3)
    return g_z, (w3 * dmu).sum(0), (w3 * ds).sum(0), w.sum(0)


_IMPLS = {"torch": (_torch_fwd, _torch_bwd), "triton": (_triton_fwd, _triton_bwd)}


# ----- the op and its autograd ------------------------------------------------------------------------------
@torch.library.custom_op("cmvae::mixture_logpdf", mutates_args=())
def mixture_logpdf_op(z: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor, log_pi: torch.Tensor,
                      is_laplace: bool, with_posterior: bool, backend: str
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log p(z) [N], resp [N, K], entropy [N]); resp and entropy are empty unless with_posterior.
    Only log p(z) is differentiable."""
    fwd = backends.lookup("mixture_logpdf", backend, "fwd", _IMPLS)
    return fwd(z, loc, scale, log_pi, is_laplace, with_posterior)


@mixture_logpdf_op.register_fake
def _(z, loc, scale, log_pi, is_laplace, with_posterior, backend):
    acc = _acc_dtype(z.dtype)
    n, k = z.shape[0], loc.shape[0]
    resp = z.new_empty((n, k) if with_posterior else (0,), dtype=acc)
    return z.new_empty(n, dtype=acc), resp, z.new_empty(n if with_posterior else 0, dtype=acc)


@torch.library.custom_op("cmvae::mixture_logpdf_backward", mutates_args=())
def mixture_logpdf_backward_op(grad_logp: torch.Tensor, z: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor,
                               log_pi: torch.Tensor, logp: torch.Tensor, is_laplace: bool, backend: str,
                               need_z: bool = True, need_params: bool = True,
                               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(g_z, g_loc, g_scale, g_log_pi) in the accumulation dtype (fp32, or fp64 for fp64 inputs). need_z /
    need_params False skip the z gradient / the (loc, scale, log_pi) reductions: those come back empty [0]."""
    bwd = backends.lookup("mixture_logpdf", backend, "bwd", _IMPLS)
    return bwd(grad_logp, z, loc, scale, log_pi, logp, is_laplace, need_z, need_params)


@mixture_logpdf_backward_op.register_fake
def _(grad_logp, z, loc, scale, log_pi, logp, is_laplace, backend, need_z=True, need_params=True):
    acc = _acc_dtype(z.dtype)

    def like(t: torch.Tensor, needed: bool) -> torch.Tensor:
        return t.new_empty(t.shape if needed else (0,), dtype=acc)

    return like(z, need_z), like(loc, need_params), like(scale, need_params), like(log_pi, need_params)


def _setup_context(ctx, inputs, output):
    z, loc, scale, log_pi, is_laplace, _, backend = inputs
    logp, resp, ent = output
    ctx.mark_non_differentiable(resp, ent)
    ctx.save_for_backward(z, loc, scale, log_pi, logp)
    ctx.is_laplace, ctx.backend = is_laplace, backend


def _backward(ctx, grad_logp, _grad_resp, _grad_ent):
    z, loc, scale, log_pi, logp = ctx.saved_tensors
    need = ctx.needs_input_grad[:4]
    need_params = any(need[1:])
    grads = mixture_logpdf_backward_op(grad_logp.contiguous(), z, loc, scale, log_pi, logp, ctx.is_laplace,
                                       ctx.backend, need[0], need_params)
    # Gradients nobody asked for are None (and were never computed when none of the parameters needs one).
    return (*(g.to(t.dtype) if n else None for g, t, n in zip(grads, (z, loc, scale, log_pi), need, strict=True)),
            None, None, None)


mixture_logpdf_op.register_autograd(_backward, setup_context=_setup_context)


def mixture_logpdf_fused(
    z: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor, log_pi: torch.Tensor, family: Family,
    with_posterior: bool, backend: str,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The op with the reference's signature: inputs promoted to one dtype (bf16/fp16 -> fp32) and made
    contiguous; resp and entropy are None unless with_posterior."""
    dtype = _acc_dtype(torch.promote_types(torch.promote_types(z.dtype, loc.dtype),
                                           torch.promote_types(scale.dtype, log_pi.dtype)))
    z, loc, scale, log_pi = (t.to(dtype).contiguous() for t in (z, loc, scale, log_pi))
    logp, resp, ent = mixture_logpdf_op(z, loc, scale, log_pi, check_family(family) == "laplace", with_posterior,
                                        backend)
    return (logp, resp, ent) if with_posterior else (logp, None, None)


# ----- plain-torch reference ----------------------------------------------------------------------------
def component_logpdf_ref(
    z: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor, log_pi: torch.Tensor, family: Family
) -> torch.Tensor:
    """[N, K] joint log-densities log pi_c + log p(z | c)."""
    lp = log_prob(z[:, None, :], loc[None], scale[None], family).sum(-1)
    return lp + log_pi[None]


def mixture_logpdf_ref(
    z: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor, log_pi: torch.Tensor, family: Family,
    with_posterior: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Plain-torch reference. z [N, D], loc/scale [K, D], log_pi [K] -> (log p(z) [N], resp [N, K], entropy [N])."""
    joint = component_logpdf_ref(z, loc, scale, log_pi, family)
    logp = torch.logsumexp(joint, dim=-1)
    if not with_posterior:
        return logp, None, None
    log_resp = joint - logp[:, None]
    resp = log_resp.exp()
    # 0 * log 0 = 0 for pruned clusters: mask instead of multiplying -inf by 0.
    entropy = -torch.where(resp > 0, resp * log_resp, torch.zeros_like(resp)).sum(-1)
    return logp, resp, entropy
