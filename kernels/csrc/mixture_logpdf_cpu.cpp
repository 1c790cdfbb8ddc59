// Mixture-prior log-density on CPU: the CPU fast path of `cmvae.mixture_logpdf`.
//
// Forward, per row n (rows in parallel):
//   joint[k] = log_pi[k] + c[k] - sum_d f(u_kd),  u_kd = (z_nd - mu_kd) / s_kd,  f = |u| (Laplace) or u^2/2 (Normal),
//   c[k] = -sum_d log(2 s_kd) (Laplace) or -sum_d (log s_kd + log(2pi)/2) (Normal);
//   logp = logsumexp_k joint (online max/rescale over k), resp = exp(joint - logp),
//   entropy = -sum_{resp > 0} resp (joint - logp).
// Backward recomputes joint and w[k] = g_n exp(joint[k] - logp_n) = g_n r_nk, then
//   g_z[n,d] = -sum_k w[k] f'(u_kd)/s_kd,  g_loc[k,d] = sum_n w f'(u)/s,  g_scale[k,d] = sum_n w (u f'(u) - 1)/s,
//   g_log_pi[k] = sum_n w, with f'(u) = sign(u) (Laplace, sign(0) = 0) or u (Normal).
// Eager torch materialises several [N, K, D] tensors; here each row streams over k with its K-vector of joints in
// L1 and the inner d loop vectorised (`omp simd`; baseline and AVX2 versions picked at load time, see cpu_math.h).
// Clusters with log_pi = -inf are skipped, so their responsibility and gradients are exact zeros.
// need_z / need_params false drop the g_z / the (g_loc, g_scale, g_log_pi) terms, returned empty [0].
#include "args.h"
#include "cpu_math.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <tuple>
#include <vector>

namespace cmvae_ext {
namespace {

// Rows per parallel task: enough work to amortise the task, small enough to split N=640 over two threads.
int64_t row_grain(int64_t K, int64_t D) {
  return std::max<int64_t>(1, (1 << 15) / std::max<int64_t>(1, K * D));
}

// Rows accumulated in the working precision before the parameter-gradient partials are added into float64:
// keeps float32 sums over N = 1M rows accurate at ~1/256 of the accumulation cost.
constexpr int64_t kFlushRows = 256;

template <typename T>
struct Clusters {
  std::vector<T> inv_scale;  // [K, D]
  std::vector<T> constant;   // [K]: log_pi + scale constant (-inf for pruned clusters)
};

template <typename T>
Clusters<T> precompute(const T* scale, const T* log_pi, int64_t K, int64_t D, bool is_laplace) {
  Clusters<T> c{std::vector<T>(K * D), std::vector<T>(K)};
  at::parallel_for(0, K, std::max<int64_t>(1, 4096 / std::max<int64_t>(1, D)), [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      const T* s = scale + k * D;
      for (int64_t d = 0; d < D; ++d) c.inv_scale[k * D + d] = T(1) / s[d];
      c.constant[k] = log_pi[k] + scale_constant(s, D, is_laplace);
    }
  });
  return c;
}

template <typename T, bool LAPLACE>
CMVAE_MULTIVERSION void forward_rows(const T* z, const T* loc, const Clusters<T>& c, int64_t n0, int64_t n1,
                                     int64_t K, int64_t D, T* logp, T* resp, T* entropy) {
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  std::vector<T> joint(K);
  for (int64_t n = n0; n < n1; ++n) {
    const T* zn = z + n * D;
    // Online logsumexp: running max m and sum s of exp(joint - m); one exp per cluster except when the max moves.
    T m = kNegInf, s = 0;
    for (int64_t k = 0; k < K; ++k) {
      const T ck = c.constant[k];
      if (ck == kNegInf) {
        joint[k] = kNegInf;
        continue;
      }
      const T j = ck - distance<T, LAPLACE>(zn, loc + k * D, c.inv_scale.data() + k * D, D);
      joint[k] = j;
      if (j > m) {
        s = (m == kNegInf ? T(0) : s * std::exp(m - j)) + T(1);
        m = j;
      } else if (j != kNegInf) {  // a joint can underflow to -inf; NaN joints propagate
        s += std::exp(j - m);
      }
    }
    const T lp = m == kNegInf ? m : m + std::log(s);
    logp[n] = lp;
    if (resp == nullptr) continue;
    T h = 0;
    for (int64_t k = 0; k < K; ++k) {
      const T lr = joint[k] - lp;
      const T r = joint[k] == kNegInf ? T(0) : std::exp(lr);
      resp[n * K + k] = r;
      if (r > 0) h -= r * lr;
    }
    entropy[n] = h;
  }
}

template <typename T>
void forward(const MixtureArgs& a, bool is_laplace, at::Tensor& logp, at::Tensor& resp, at::Tensor& entropy) {
  const int64_t K = a.K, D = a.D;
  const T* z = a.z.const_data_ptr<T>();
  const T* loc = a.loc.const_data_ptr<T>();
  const auto c = precompute(a.scale.const_data_ptr<T>(), a.log_pi.const_data_ptr<T>(), K, D, is_laplace);
  T* lp = logp.mutable_data_ptr<T>();
  T* r = resp.numel() ? resp.mutable_data_ptr<T>() : nullptr;
  T* h = entropy.numel() ? entropy.mutable_data_ptr<T>() : nullptr;
  at::parallel_for(0, a.N, row_grain(K, D), [&](int64_t n0, int64_t n1) {
    if (is_laplace) {
      forward_rows<T, true>(z, loc, c, n0, n1, K, D, lp, r, h);
    } else {
      forward_rows<T, false>(z, loc, c, n0, n1, K, D, lp, r, h);
    }
  });
}

// Parameter-gradient accumulators of one task: a working-precision block flushed into float64 every kFlushRows.
template <typename T>
struct Partial {
  std::vector<T> loc, scale, log_pi;           // block, [K*D], [K*D], [K]
  std::vector<double> loc64, scale64, log_pi64;  // task totals

  Partial(int64_t K, int64_t D)
      : loc(K * D), scale(K * D), log_pi(K), loc64(K * D), scale64(K * D), log_pi64(K) {}

  void flush() {
    auto add = [](std::vector<double>& dst, std::vector<T>& src) {
      for (size_t i = 0; i < src.size(); ++i) dst[i] += static_cast<double>(src[i]);
      std::fill(src.begin(), src.end(), T(0));
    };
    add(loc64, loc);
    add(scale64, scale);
    add(log_pi64, log_pi);
  }
};

template <typename T, bool LAPLACE, bool GZ, bool GP>
CMVAE_MULTIVERSION void backward_rows(const T* z, const T* loc, const T* g, const T* logp, const Clusters<T>& c,
                                      int64_t n0, int64_t n1, int64_t K, int64_t D, T* g_z, Partial<T>& p) {
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  for (int64_t n = n0; n < n1; ++n) {
    const T* zn = z + n * D;
    T* gz = GZ ? g_z + n * D : nullptr;
    if constexpr (GZ) std::fill(gz, gz + D, T(0));
    const T gn = g[n], lp = logp[n];
    for (int64_t k = 0; k < K; ++k) {
      const T ck = c.constant[k];
      if (ck == kNegInf) continue;  // pruned: exact zero gradient
      const T* mu = loc + k * D;
      const T* is = c.inv_scale.data() + k * D;
      const T w = gn * std::exp(ck - distance<T, LAPLACE>(zn, mu, is, D) - lp);
      if (w == 0) continue;  // underflowed responsibility (far cluster) or zero incoming gradient
      if constexpr (GP) {
        p.log_pi[k] += w;
        add_gradients<T, LAPLACE, GZ, GP>(zn, mu, is, w, D, gz, p.loc.data() + k * D, p.scale.data() + k * D);
      } else {
        add_gradients<T, LAPLACE, GZ, GP>(zn, mu, is, w, D, gz, nullptr, nullptr);
      }
    }
    if (GP && (n - n0 + 1) % kFlushRows == 0) p.flush();
  }
  if constexpr (GP) p.flush();
}

template <typename T, bool LAPLACE>
void backward_rows_for(bool need_z, bool need_params, const T* z, const T* loc, const T* g, const T* logp,
                       const Clusters<T>& c, int64_t n0, int64_t n1, int64_t K, int64_t D, T* g_z, Partial<T>& p) {
  if (need_z && need_params) {
    backward_rows<T, LAPLACE, true, true>(z, loc, g, logp, c, n0, n1, K, D, g_z, p);
  } else if (need_z) {
    backward_rows<T, LAPLACE, true, false>(z, loc, g, logp, c, n0, n1, K, D, g_z, p);
  } else {
    backward_rows<T, LAPLACE, false, true>(z, loc, g, logp, c, n0, n1, K, D, g_z, p);
  }
}

template <typename T>
void backward(const MixtureArgs& a, const at::Tensor& grad, const at::Tensor& logp, bool is_laplace, bool need_z,
              bool need_params, at::Tensor& g_z, at::Tensor& g_loc, at::Tensor& g_scale, at::Tensor& g_log_pi) {
  const int64_t N = a.N, K = a.K, D = a.D;
  const T* z = a.z.const_data_ptr<T>();
  const T* loc = a.loc.const_data_ptr<T>();
  const T* g = grad.const_data_ptr<T>();
  const T* lp = logp.const_data_ptr<T>();
  const auto c = precompute(a.scale.const_data_ptr<T>(), a.log_pi.const_data_ptr<T>(), K, D, is_laplace);
  T* gz = need_z ? g_z.mutable_data_ptr<T>() : nullptr;

  // One task (and one partial buffer) per thread at most, reduced below in a fixed order: results depend on the
  // thread count only through the summation order, and no atomics are needed.
  const int64_t grain = row_grain(K, D);
  const int64_t tasks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), (N + grain - 1) / grain));
  const int64_t rows_per_task = (N + tasks - 1) / tasks;
  std::vector<Partial<T>> partials;
  partials.reserve(tasks);
  for (int64_t i = 0; i < tasks; ++i) partials.emplace_back(need_params ? K : 0, need_params ? D : 0);
  at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n0 = t * rows_per_task, n1 = std::min(N, n0 + rows_per_task);
      if (n0 >= n1) continue;
      if (is_laplace) {
        backward_rows_for<T, true>(need_z, need_params, z, loc, g, lp, c, n0, n1, K, D, gz, partials[t]);
      } else {
        backward_rows_for<T, false>(need_z, need_params, z, loc, g, lp, c, n0, n1, K, D, gz, partials[t]);
      }
    }
  });
  if (!need_params) return;

  T* gl = g_loc.mutable_data_ptr<T>();
  T* gs = g_scale.mutable_data_ptr<T>();
  T* gp = g_log_pi.mutable_data_ptr<T>();
  at::parallel_for(0, K * D, 4096, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      double l = 0, s = 0;
      for (const auto& p : partials) {
        l += p.loc64[i];
        s += p.scale64[i];
      }
      gl[i] = static_cast<T>(l);
      gs[i] = static_cast<T>(s);
    }
  });
  for (int64_t k = 0; k < K; ++k) {
    double s = 0;
    for (const auto& p : partials) s += p.log_pi64[k];
    gp[k] = static_cast<T>(s);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> mixture_logpdf_fwd_cpu(const at::Tensor& z, const at::Tensor& loc,
                                                                      const at::Tensor& scale,
                                                                      const at::Tensor& log_pi, bool is_laplace,
                                                                      bool with_posterior) {
  const auto a = prepare_mixture("mixture_logpdf_fwd", z, loc, scale, log_pi);
  const auto opts = a.z.options();
  auto logp = at::empty({a.N}, opts);
  auto resp = with_posterior ? at::empty({a.N, a.K}, opts) : at::empty({0}, opts);
  auto entropy = with_posterior ? at::empty({a.N}, opts) : at::empty({0}, opts);
  AT_DISPATCH_FLOATING_TYPES(a.z.scalar_type(), "mixture_logpdf_fwd_cpu",
                             [&] { forward<scalar_t>(a, is_laplace, logp, resp, entropy); });
  return {logp, resp, entropy};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> mixture_logpdf_bwd_cpu(
    const at::Tensor& grad_logp, const at::Tensor& z, const at::Tensor& loc, const at::Tensor& scale,
    const at::Tensor& log_pi, const at::Tensor& logp, bool is_laplace, bool need_z, bool need_params) {
  constexpr const char* op = "mixture_logpdf_bwd";
  const auto a = prepare_mixture(op, z, loc, scale, log_pi);
  const auto dtype = a.z.scalar_type();
  const auto g = prepare_row_vector(op, "grad_logp", grad_logp, a.N, dtype, a.z);
  const auto lp = prepare_row_vector(op, "logp", logp, a.N, dtype, a.z);
  const auto opts = a.z.options();
  const auto sized = [&](std::vector<int64_t> shape, bool needed) {
    return needed ? at::empty(shape, opts) : at::empty({0}, opts);
  };
  auto g_z = sized({a.N, a.D}, need_z);
  auto g_loc = sized({a.K, a.D}, need_params);
  auto g_scale = sized({a.K, a.D}, need_params);
  auto g_log_pi = sized({a.K}, need_params);
  if (!need_z && !need_params) return {g_z, g_loc, g_scale, g_log_pi};
  AT_DISPATCH_FLOATING_TYPES(dtype, "mixture_logpdf_bwd_cpu", [&] {
    backward<scalar_t>(a, g, lp, is_laplace, need_z, need_params, g_z, g_loc, g_scale, g_log_pi);
  });
  return {g_z, g_loc, g_scale, g_log_pi};
}

}  // namespace
}  // namespace cmvae_ext

TORCH_LIBRARY_IMPL(cmvae_ext, CPU, m) {
  m.impl("mixture_logpdf_fwd", &cmvae_ext::mixture_logpdf_fwd_cpu);
  m.impl("mixture_logpdf_bwd", &cmvae_ext::mixture_logpdf_bwd_cpu);
}
