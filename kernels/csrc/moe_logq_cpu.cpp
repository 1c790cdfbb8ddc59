// Mixture-of-experts posterior density on CPU (`cmvae.moe_logq`).
//
// Forward, per row (m, s, b) (rows in parallel):
//   lq[e] = c[e,b] - sum_d f((z[m,s,b,d] - loc[e,b,d]) / scale[e,b,d])   (f and c as in cpu_math.h),
//   out[m,s,b] = logsumexp_e lq[e] - log E  (online max/rescale over e).
// Backward: w[e] = g[m,s,b] exp(lq[e] - log E - out[m,s,b]) (the responsibility times the incoming gradient);
//   g_z = -sum_e w f'/s,  g_loc[e,b] = sum_{m,s} w f'/s,  g_scale[e,b] = sum_{m,s} w (u f' - 1)/s.
// The backward runs in parallel over b: the rows of one b are the only ones touching loc[:, b] and scale[:, b],
// so each task owns its parameter-gradient slice outright (no partial buffers to reduce, no atomics).
// need_params=false (detached experts, as under DReG) drops the g_loc/g_scale terms and returns them empty.
#include "args.h"
#include "cpu_math.h"

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

template <typename T>
struct Experts {
  std::vector<T> inv_scale;  // [E, B, D]
  std::vector<T> constant;   // [E, B]
};

template <typename T>
Experts<T> precompute(const T* scale, int64_t EB, int64_t D, bool is_laplace) {
  Experts<T> x{std::vector<T>(EB * D), std::vector<T>(EB)};
  at::parallel_for(0, EB, std::max<int64_t>(1, 4096 / std::max<int64_t>(1, D)), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      for (int64_t d = 0; d < D; ++d) x.inv_scale[i * D + d] = T(1) / scale[i * D + d];
      x.constant[i] = scale_constant(scale + i * D, D, is_laplace);
    }
  });
  return x;
}

// lq[e] for row i (batch index b) -> logsumexp_e lq[e] - log E.
template <typename T, bool LAPLACE>
CMVAE_MULTIVERSION T row_logq(const T* zi, const T* loc, const Experts<T>& x, int64_t b, int64_t B, int64_t E,
                              int64_t D) {
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  T m = kNegInf, s = 0;
  for (int64_t e = 0; e < E; ++e) {
    const int64_t eb = e * B + b;
    const T j = x.constant[eb] - distance<T, LAPLACE>(zi, loc + eb * D, x.inv_scale.data() + eb * D, D);
    if (j > m) {
      s = (m == kNegInf ? T(0) : s * std::exp(m - j)) + T(1);
      m = j;
    } else if (j != kNegInf) {  // a log-density can underflow to -inf
      s += std::exp(j - m);
    }
  }
  const T log_e = std::log(static_cast<T>(E));
  return m == kNegInf ? m : m + std::log(s) - log_e;
}

template <typename T>
void forward(const MoeArgs& a, bool is_laplace, at::Tensor& out) {
  const int64_t B = a.B, E = a.E, D = a.D, rows = a.M * a.S * a.B;
  const T* z = a.z.const_data_ptr<T>();
  const T* loc = a.loc.const_data_ptr<T>();
  const auto x = precompute(a.scale.const_data_ptr<T>(), E * B, D, is_laplace);
  T* o = out.mutable_data_ptr<T>();
  const int64_t grain = std::max<int64_t>(1, (1 << 14) / std::max<int64_t>(1, E * D));
  at::parallel_for(0, rows, grain, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i % B;
      o[i] = is_laplace ? row_logq<T, true>(z + i * D, loc, x, b, B, E, D)
                        : row_logq<T, false>(z + i * D, loc, x, b, B, E, D);
    }
  });
}

template <typename T, bool LAPLACE, bool PARAMS>
CMVAE_MULTIVERSION void backward_batch(const MoeArgs& a, const T* z, const T* loc, const T* g, const T* out,
                                       const Experts<T>& x, int64_t b, T* g_z, T* g_loc, T* g_scale) {
  const int64_t B = a.B, E = a.E, D = a.D, MS = a.M * a.S;
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  const T log_e = std::log(static_cast<T>(E));
  for (int64_t e = 0; PARAMS && e < E; ++e) {
    std::fill(g_loc + (e * B + b) * D, g_loc + (e * B + b + 1) * D, T(0));
    std::fill(g_scale + (e * B + b) * D, g_scale + (e * B + b + 1) * D, T(0));
  }
  for (int64_t ms = 0; ms < MS; ++ms) {
    const int64_t i = ms * B + b;
    const T* zi = z + i * D;
    T* gz = g_z + i * D;
    std::fill(gz, gz + D, T(0));
    if (out[i] == kNegInf) continue;
    for (int64_t e = 0; e < E; ++e) {
      const int64_t eb = e * B + b;
      const T* mu = loc + eb * D;
      const T* is = x.inv_scale.data() + eb * D;
      const T w = g[i] * std::exp(x.constant[eb] - distance<T, LAPLACE>(zi, mu, is, D) - log_e - out[i]);
      if (w == 0) continue;
      if constexpr (PARAMS) {
        add_gradients<T, LAPLACE>(zi, mu, is, w, D, gz, g_loc + eb * D, g_scale + eb * D);
      } else {
        add_gradients<T, LAPLACE, true, false>(zi, mu, is, w, D, gz, nullptr, nullptr);
      }
    }
  }
}

template <typename T>
void backward(const MoeArgs& a, const at::Tensor& grad, const at::Tensor& out, bool is_laplace, bool need_params,
              at::Tensor& g_z, at::Tensor& g_loc, at::Tensor& g_scale) {
  const T* z = a.z.const_data_ptr<T>();
  const T* loc = a.loc.const_data_ptr<T>();
  const auto x = precompute(a.scale.const_data_ptr<T>(), a.E * a.B, a.D, is_laplace);
  const T* g = grad.const_data_ptr<T>();
  const T* o = out.const_data_ptr<T>();
  T* gz = g_z.mutable_data_ptr<T>();
  T* gl = need_params ? g_loc.mutable_data_ptr<T>() : nullptr;
  T* gs = need_params ? g_scale.mutable_data_ptr<T>() : nullptr;
  const int64_t grain = std::max<int64_t>(1, (1 << 14) / std::max<int64_t>(1, a.M * a.S * a.E * a.D));
  at::parallel_for(0, a.B, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      if (is_laplace) {
        need_params ? backward_batch<T, true, true>(a, z, loc, g, o, x, b, gz, gl, gs)
                    : backward_batch<T, true, false>(a, z, loc, g, o, x, b, gz, gl, gs);
      } else {
        need_params ? backward_batch<T, false, true>(a, z, loc, g, o, x, b, gz, gl, gs)
                    : backward_batch<T, false, false>(a, z, loc, g, o, x, b, gz, gl, gs);
      }
    }
  });
}

at::Tensor moe_logq_fwd_cpu(const at::Tensor& z, const at::Tensor& loc, const at::Tensor& scale, bool is_laplace) {
  const auto a = prepare_moe("moe_logq_fwd", z, loc, scale);
  auto out = at::empty({a.M, a.S, a.B}, a.z.options());
  AT_DISPATCH_FLOATING_TYPES(a.z.scalar_type(), "moe_logq_fwd_cpu", [&] { forward<scalar_t>(a, is_laplace, out); });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> moe_logq_bwd_cpu(const at::Tensor& grad_out, const at::Tensor& z,
                                                                const at::Tensor& loc, const at::Tensor& scale,
                                                                const at::Tensor& out, bool is_laplace,
                                                                bool need_params) {
  constexpr const char* op = "moe_logq_bwd";
  const auto a = prepare_moe(op, z, loc, scale);
  const auto dtype = a.z.scalar_type();
  const auto shape = std::vector<int64_t>{a.M, a.S, a.B};
  const auto g = prepare_same_shape(op, "grad_out", grad_out, shape, dtype, a.z);
  const auto o = prepare_same_shape(op, "out", out, shape, dtype, a.z);
  auto g_z = at::empty_like(a.z);
  auto g_loc = need_params ? at::empty_like(a.loc) : at::empty({0}, a.loc.options());
  auto g_scale = need_params ? at::empty_like(a.scale) : at::empty({0}, a.scale.options());
  AT_DISPATCH_FLOATING_TYPES(dtype, "moe_logq_bwd_cpu",
                             [&] { backward<scalar_t>(a, g, o, is_laplace, need_params, g_z, g_loc, g_scale); });
  return {g_z, g_loc, g_scale};
}

}  // namespace
}  // namespace cmvae_ext

TORCH_LIBRARY_IMPL(cmvae_ext, CPU, m) {
  m.impl("moe_logq_fwd", &cmvae_ext::moe_logq_fwd_cpu);
  m.impl("moe_logq_bwd", &cmvae_ext::moe_logq_bwd_cpu);
}
