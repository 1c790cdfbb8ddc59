"""Image log-likelihood summed over pixels: sum_p log F(x_p | pred_p, scale) for a fixed scale.

pred [..., B, C, H, W] holds decoder outputs for R = prod(...) latent draws of each datapoint; target
[B, C, H, W] is broadcast against them, so the targets are never copied R times.

The fused op `cmvae::image_loglik` works on pred [R, B, P] and target [B, P]: the forward reads each pixel
once and accumulates sum_p |target - pred| (Laplace) or sum_p (target - pred)^2 (Normal) in fp32 (fp64 for
fp64 inputs), whatever the dtype of pred; the backward writes g_pred in pred's dtype and saves nothing but
the inputs. The per-row constants (1/scale, log-normaliser) are applied on the host side of the launch in
double precision, so a Python-float scale is never rounded to a kernel's fp32 scalar argument.
"""

from __future__ import annotations

import math

import torch

from cmvae_engine.kernels import backends
from cmvae_engine.kernels._triton import INTERPRETING, jit, next_pow2, tl, triton
from cmvae_engine.kernels.densities import Family, check_family, log_prob_const_scale

_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)
# Pixels per program step: 1024 is 8 per thread at 4 warps; the interpreter takes whole rows at once.
_BLOCK_P = 65536 if INTERPRETING else 1024


# ----- Triton kernels ---------------------------------------------------------------------------------
@jit
def _image_fwd_kernel(pred_ptr, target_ptr, sums_ptr, B, P, IS_LAPLACE: tl.constexpr, BLOCK_P: tl.constexpr):
    """Program (row = r * B + b): sums[row] = sum_p |t - x| (Laplace) or sum_p (t - x)^2 (Normal) with
    t = target[b, p], x = pred[r, b, p], loaded in any float dtype and accumulated in sums' dtype."""
    ACC = sums_ptr.dtype.element_ty
    row = tl.program_id(0).to(tl.int64)
    b = row % B
    acc = tl.zeros([BLOCK_P], ACC)
    for p0 in range(0, P, BLOCK_P):
        offs = p0 + tl.arange(0, BLOCK_P)
        mask = offs < P
        x = tl.load(pred_ptr + row * P + offs, mask=mask, other=0.0).to(ACC)
        t = tl.load(target_ptr + b * P + offs, mask=mask, other=0.0).to(ACC)
        diff = t - x
        if IS_LAPLACE:
            acc += tl.abs(diff)
        else:
            acc += diff * diff
    tl.store(sums_ptr + row, tl.sum(acc, axis=0))


@jit
def _image_bwd_kernel(coef_ptr, pred_ptr, target_ptr, gpred_ptr, B, P, IS_LAPLACE: tl.constexpr,
                      BLOCK_P: tl.constexpr):
    """g_pred[r, b, p] = coef[r, b] * sign(t - x) (Laplace, coef = grad_out / scale) or coef[r, b] * (t - x)
    (Normal, coef = grad_out / scale^2), stored in pred's dtype."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    mask = offs < P
    coef = tl.load(coef_ptr + row)
    x = tl.load(pred_ptr + row * P + offs, mask=mask, other=0.0).to(coef.dtype)
    t = tl.load(target_ptr + (row % B) * P + offs, mask=mask, other=0.0).to(coef.dtype)
    slope = t - x
    if IS_LAPLACE:
        slope = tl.where(slope > 0, 1.0, tl.where(slope < 0, -1.0, 0.0))
    tl.store(gpred_ptr + row * P + offs, (coef * slope).to(gpred_ptr.dtype.element_ty), mask=mask)


# ----- launchers (the triton backend) ---------------------------------------------------------------------
def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _finish(sums: torch.Tensor, n_pixels: int, scale: float, is_laplace: bool) -> torch.Tensor:
    """log-likelihood from the per-row sums, in place: Laplace -S/scale - P log(2 scale); Normal
    -S/(2 scale^2) - P (log scale + log(2 pi)/2)."""
    if is_laplace:
        return sums.mul_(-1.0 / scale).sub_(n_pixels * math.log(2.0 * scale))
    return sums.mul_(-0.5 / scale**2).sub_(n_pixels * (math.log(scale) + _HALF_LOG_2PI))


def _block_p(n_pixels: int) -> int:
    return min(next_pow2(n_pixels), _BLOCK_P)


def _triton_fwd(pred: torch.Tensor, target: torch.Tensor, scale: float, is_laplace: bool) -> torch.Tensor:
    r, b, p = pred.shape
    sums = torch.empty((r, b), dtype=_acc_dtype(pred.dtype), device=pred.device)
    if sums.numel():
        _image_fwd_kernel[(r * b,)](pred, target, sums, b, p, IS_LAPLACE=is_laplace, BLOCK_P=_block_p(p),
                                    num_warps=4)
    return _finish(sums, p, scale, is_laplace)


def _triton_bwd(grad_out: torch.Tensor, pred: torch.Tensor, target: torch.Tensor, scale: float,
                is_laplace: bool) -> torch.Tensor:
    r, b, p = pred.shape
    coef = grad_out.to(_acc_dtype(pred.dtype)) * (1.0 / scale if is_laplace else 1.0 / scale**2)
    g_pred = torch.empty_like(pred)
    if g_pred.numel():
        block = _block_p(p)
        _image_bwd_kernel[(r * b, triton.cdiv(p, block))](coef.contiguous(), pred, target, g_pred, b, p,
                                                          IS_LAPLACE=is_laplace, BLOCK_P=block, num_warps=4)
    return g_pred


# ----- the torch backend of the op -----------------------------------------------------------------------
def _torch_fwd(pred: torch.Tensor, target: torch.Tensor, scale: float, is_laplace: bool) -> torch.Tensor:
    acc = _acc_dtype(pred.dtype)
    lp = log_prob_const_scale(target.to(acc)[None], pred.to(acc), scale, "laplace" if is_laplace else "normal")
    return lp.sum(-1)


def _torch_bwd(grad_out: torch.Tensor, pred: torch.Tensor, target: torch.Tensor, scale: float,
               is_laplace: bool) -> torch.Tensor:
    acc = _acc_dtype(pred.dtype)
    diff = target.to(acc)[None] - pred.to(acc)
    g = grad_out.to(acc)[..., None]
    return (g * diff.sign() / scale if is_laplace else g * diff / scale**2).to(pred.dtype)


_IMPLS = {"torch": (_torch_fwd, _torch_bwd), "triton": (_triton_fwd, _triton_bwd)}


# ----- the op and its autograd ------------------------------------------------------------------------------
@torch.library.custom_op("cmvae::image_loglik", mutates_args=())
def image_loglik_op(pred: torch.Tensor, target: torch.Tensor, scale: float, is_laplace: bool,
                    backend: str) -> torch.Tensor:
    """[R, B] = sum_p log F(target[b, p] | pred[r, b, p], scale); fp32 for bf16/fp16 pred. Gradient for pred only."""
    return backends.lookup("image_loglik", backend, "fwd", _IMPLS)(pred, target, scale, is_laplace)


@image_loglik_op.register_fake
def _(pred, target, scale, is_laplace, backend):
    return pred.new_empty(pred.shape[:2], dtype=_acc_dtype(pred.dtype))


@torch.library.custom_op("cmvae::image_loglik_backward", mutates_args=())
def image_loglik_backward_op(grad_out: torch.Tensor, pred: torch.Tensor, target: torch.Tensor, scale: float,
                             is_laplace: bool, backend: str) -> torch.Tensor:
    """g_pred [R, B, P] in pred's dtype."""
    return backends.lookup("image_loglik", backend, "bwd", _IMPLS)(grad_out, pred, target, scale, is_laplace)


@image_loglik_backward_op.register_fake
def _(grad_out, pred, target, scale, is_laplace, backend):
    return torch.empty_like(pred)


def _setup_context(ctx, inputs, output):
    pred, target, scale, is_laplace, backend = inputs
    ctx.save_for_backward(pred, target)
    ctx.scale, ctx.is_laplace, ctx.backend = scale, is_laplace, backend


def _backward(ctx, grad_out):
    pred, target = ctx.saved_tensors
    g_pred = image_loglik_backward_op(grad_out.contiguous(), pred, target, ctx.scale, ctx.is_laplace, ctx.backend)
    return g_pred, None, None, None, None


image_loglik_op.register_autograd(_backward, setup_context=_setup_context)


def image_loglik_fused(pred: torch.Tensor, target: torch.Tensor, scale: float, family: Family,
                       backend: str) -> torch.Tensor:
    """The op with the reference's signature: pred [..., B, C, H, W], target [B, C, H, W] -> [..., B].
    target is cast to pred's dtype first, as the reference does."""
    if pred.dim() < 4 or pred.shape[-4:] != target.shape:
        raise ValueError(f"image_loglik: pred {tuple(pred.shape)} must end with target's shape "
                         f"{tuple(target.shape)}")
    lead, b = pred.shape[:-4], target.shape[0]
    flat_pred = pred.reshape(-1, b, target[0].numel()).contiguous()
    flat_target = target.to(pred.dtype).reshape(b, -1).contiguous()
    out = image_loglik_op(flat_pred, flat_target, float(scale), check_family(family) == "laplace", backend)
    return out.view(*lead, b)


# ----- plain-torch reference ----------------------------------------------------------------------------
def image_loglik_ref(pred: torch.Tensor, target: torch.Tensor, scale: float, family: Family) -> torch.Tensor:
    """Plain-torch reference -> [..., B] log-likelihood (positive is better)."""
    return log_prob_const_scale(target.to(pred.dtype), pred, scale, family).flatten(-3).sum(-1)
