// Image log-likelihood summed over pixels on CPU (`cmvae.image_loglik`): pred [R, B, P], target [B, P] broadcast
// over R (never copied R times), a fixed scale s. With u = (target - pred) / s:
//   Laplace out[r,b] = -sum_p |u| - P log(2s);            g_pred = grad_out[r,b] sign(u) / s
//   Normal  out[r,b] = -sum_p u^2/2 - P (log s + log(2pi)/2); g_pred = grad_out[r,b] u / s
// pred may be bfloat16/float16: it is read in its own dtype (the large tensor) and accumulated in float32; the
// output is float32 then, g_pred has pred's dtype.
#include "args.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>

namespace cmvae_ext {
namespace {

template <typename T, typename A, bool LAPLACE>
A row_sum(const T* __restrict pred, const A* __restrict target, A inv_s, int64_t P) {
  A acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int64_t p = 0; p < P; ++p) {
    const A u = (target[p] - static_cast<A>(pred[p])) * inv_s;
    acc += LAPLACE ? std::abs(u) : u * u;
  }
  return LAPLACE ? acc : A(0.5) * acc;
}

template <typename T, typename A, bool LAPLACE>
void row_grad(const T* __restrict pred, const A* __restrict target, A inv_s, A g, int64_t P, T* __restrict out) {
#pragma omp simd
  for (int64_t p = 0; p < P; ++p) {
    const A u = (target[p] - static_cast<A>(pred[p])) * inv_s;
    const A fp = LAPLACE ? static_cast<A>(u > 0) - static_cast<A>(u < 0) : u;
    out[p] = static_cast<T>(g * fp * inv_s);
  }
}

at::Tensor image_loglik_fwd_cpu(const at::Tensor& pred, const at::Tensor& target, double scale, bool is_laplace) {
  const auto a = prepare_image("image_loglik_fwd", pred, target, scale);
  auto out = at::empty({a.R, a.B}, a.pred.options().dtype(a.acc_dtype));
  const int64_t B = a.B, P = a.P;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.pred.scalar_type(), "image_loglik_fwd_cpu", [&] {
    using A = at::opmath_type<scalar_t>;
    const scalar_t* x = a.pred.const_data_ptr<scalar_t>();
    const A* t = a.target.const_data_ptr<A>();
    A* o = out.mutable_data_ptr<A>();
    const A inv_s = static_cast<A>(1.0 / scale);
    const A constant = static_cast<A>(P) * static_cast<A>(is_laplace ? std::log(2.0 * scale)
                                                                      : std::log(scale) + kHalfLog2Pi);
    at::parallel_for(0, a.R * B, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, P)), [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const scalar_t* xi = x + i * P;
        const A* ti = t + (i % B) * P;
        const A s = is_laplace ? row_sum<scalar_t, A, true>(xi, ti, inv_s, P)
                               : row_sum<scalar_t, A, false>(xi, ti, inv_s, P);
        o[i] = -s - constant;
      }
    });
  });
  return out;
}

at::Tensor image_loglik_bwd_cpu(const at::Tensor& grad_out, const at::Tensor& pred, const at::Tensor& target,
                                double scale, bool is_laplace) {
  constexpr const char* op = "image_loglik_bwd";
  const auto a = prepare_image(op, pred, target, scale);
  const auto g = prepare_same_shape(op, "grad_out", grad_out, {a.R, a.B}, a.acc_dtype, a.pred);
  auto g_pred = at::empty_like(a.pred);
  const int64_t B = a.B, P = a.P;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.pred.scalar_type(), "image_loglik_bwd_cpu", [&] {
    using A = at::opmath_type<scalar_t>;
    const scalar_t* x = a.pred.const_data_ptr<scalar_t>();
    const A* t = a.target.const_data_ptr<A>();
    const A* gp = g.const_data_ptr<A>();
    scalar_t* o = g_pred.mutable_data_ptr<scalar_t>();
    const A inv_s = static_cast<A>(1.0 / scale);
    at::parallel_for(0, a.R * B, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, P)), [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        if (is_laplace) {
          row_grad<scalar_t, A, true>(x + i * P, t + (i % B) * P, inv_s, gp[i], P, o + i * P);
        } else {
          row_grad<scalar_t, A, false>(x + i * P, t + (i % B) * P, inv_s, gp[i], P, o + i * P);
        }
      }
    });
  });
  return g_pred;
}

}  // namespace
}  // namespace cmvae_ext

TORCH_LIBRARY_IMPL(cmvae_ext, CPU, m) {
  m.impl("image_loglik_fwd", &cmvae_ext::image_loglik_fwd_cpu);
  m.impl("image_loglik_bwd", &cmvae_ext::image_loglik_bwd_cpu);
}
