// IWAE bound and importance weights on CPU (`cmvae.importance_weights`), lw [M, S, B] in one pass per datapoint:
//   lse[m,b] = logsumexp_s lw[m,s,b],  bound[b] = mean_m (lse[m,b] - log S),
//   weights[m,s,b] = exp(lw[m,s,b] - lse[m,b])  (softmax over s),  sq_weights = weights^2.
// Backward (only the bound is differentiable): g_lw[m,s,b] = grad_bound[b] weights[m,s,b] / M.
// Parallel over blocks of datapoints b; inside a block the loops run along b, the contiguous axis.
#include "args.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <tuple>
#include <vector>

namespace cmvae_ext {
namespace {

constexpr int64_t kBlock = 64;

template <typename T>
void forward(const T* lw, int64_t M, int64_t S, int64_t B, T* bound, T* weights, T* sq) {
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  const T log_s = std::log(static_cast<T>(S));
  at::parallel_for(0, (B + kBlock - 1) / kBlock, 1, [&](int64_t blk0, int64_t blk1) {
    T mx[kBlock], sum[kBlock], acc[kBlock];  // per b: max, sum of exp(x - max) (then its inverse), bound
    for (int64_t blk = blk0; blk < blk1; ++blk) {
      const int64_t b0 = blk * kBlock, nb = std::min(B - b0, kBlock);
      std::fill(acc, acc + nb, T(0));
      for (int64_t m = 0; m < M; ++m) {
        const T* x = lw + m * S * B + b0;
        std::fill(mx, mx + nb, kNegInf);
        for (int64_t s = 0; s < S; ++s)
          for (int64_t j = 0; j < nb; ++j) mx[j] = std::max(mx[j], x[s * B + j]);
        std::fill(sum, sum + nb, T(0));
        // exp(x - max) with max = -inf (all samples -inf) would be NaN: the row's logsumexp is -inf, as torch's.
        for (int64_t s = 0; s < S; ++s)
          for (int64_t j = 0; j < nb; ++j) sum[j] += mx[j] == kNegInf ? T(0) : std::exp(x[s * B + j] - mx[j]);
        for (int64_t j = 0; j < nb; ++j) {
          acc[j] += (mx[j] == kNegInf ? kNegInf : mx[j] + std::log(sum[j])) - log_s;
          sum[j] = T(1) / sum[j];
        }
        // exp(x - max) / sum rather than exp(x - logsumexp): the logsumexp of log-weights in the hundreds carries
        // an absolute rounding error that exp would turn into a relative error of the weights.
        T* w = weights + m * S * B + b0;
        T* w2 = sq + m * S * B + b0;
        for (int64_t s = 0; s < S; ++s) {
          for (int64_t j = 0; j < nb; ++j) {
            const T v = std::exp(x[s * B + j] - mx[j]) * sum[j];  // NaN when all of the row is -inf, as softmax
            w[s * B + j] = v;
            w2[s * B + j] = v * v;
          }
        }
      }
      for (int64_t j = 0; j < nb; ++j) bound[b0 + j] = acc[j] / static_cast<T>(M);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> importance_weights_fwd_cpu(const at::Tensor& lw) {
  constexpr const char* op = "importance_weights_fwd";
  check_floating(lw, op, "lw");
  check_dim(lw, 3, op, "lw", "[M, S, B]");
  TORCH_CHECK(lw.size(0) >= 1 && lw.size(1) >= 1, "cmvae_ext.", op,
              ": 'lw' [M, S, B] needs M >= 1 and S >= 1, got ", lw.sizes());
  const auto x = prepare(lw, compute_dtype(lw.scalar_type()));
  const int64_t M = x.size(0), S = x.size(1), B = x.size(2);
  auto bound = at::empty({B}, x.options());
  auto weights = at::empty_like(x);
  auto sq = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "importance_weights_fwd_cpu", [&] {
    forward<scalar_t>(x.const_data_ptr<scalar_t>(), M, S, B, bound.mutable_data_ptr<scalar_t>(),
                      weights.mutable_data_ptr<scalar_t>(), sq.mutable_data_ptr<scalar_t>());
  });
  return {bound, weights, sq};
}

at::Tensor importance_weights_bwd_cpu(const at::Tensor& grad_bound, const at::Tensor& weights) {
  constexpr const char* op = "importance_weights_bwd";
  check_floating(weights, op, "weights");
  check_dim(weights, 3, op, "weights", "[M, S, B]");
  const auto dtype = compute_dtype(weights.scalar_type());
  const auto w = prepare(weights, dtype);
  const int64_t M = w.size(0), S = w.size(1), B = w.size(2);
  const auto g = prepare_row_vector(op, "grad_bound", grad_bound, B, dtype, w);
  auto out = at::empty_like(w);
  AT_DISPATCH_FLOATING_TYPES(dtype, "importance_weights_bwd_cpu", [&] {
    const scalar_t* gb = g.const_data_ptr<scalar_t>();
    const scalar_t* wp = w.const_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    const scalar_t inv_m = scalar_t(1) / static_cast<scalar_t>(M);
    at::parallel_for(0, M * S, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, B)), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r)
        for (int64_t b = 0; b < B; ++b) o[r * B + b] = gb[b] * wp[r * B + b] * inv_m;
    });
  });
  return out;
}

}  // namespace
}  // namespace cmvae_ext

TORCH_LIBRARY_IMPL(cmvae_ext, CPU, m) {
  m.impl("importance_weights_fwd", &cmvae_ext::importance_weights_fwd_cpu);
  m.impl("importance_weights_bwd", &cmvae_ext::importance_weights_bwd_cpu);
}
