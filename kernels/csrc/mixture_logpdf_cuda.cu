// Mixture-prior log-density on CUDA: the same math as mixture_logpdf_cpu.cpp (see there), accumulating in the
// compute dtype (float32 for float32/bf16/fp16 inputs, float64 for float64).
//
// Forward: one warp per row; lanes split d, a shuffle reduction gives joint[k], and every lane keeps the same
// online logsumexp state over k. With the posterior, joint[k] is parked in resp and turned into exp(joint - logp)
// by a second pass over k (lanes split k).
// Backward: a persistent grid of blocks walks row tiles. Per tile the z rows and their g_z accumulators sit in
// shared memory; per cluster k, warps compute w[r] = g_r exp(joint[r,k] - logp_r) for the tile's rows, then
// threads split d, update g_z in shared memory and add the tile's sum into the block's own slice of a
// [blocks, K, D] partial buffer (each (k, d) of a slice is only ever touched by one thread: no atomics). A reduce
// kernel sums the slices once.
#include "cuda_common.cuh"

#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

namespace cmvae_ext::cuda {
namespace {

constexpr int64_t kMaxTileRows = 32;
constexpr int64_t kTileSmemBytes = 48 * 1024;             // the default dynamic shared-memory limit
constexpr int64_t kPartialBytes = int64_t(128) << 20;      // cap on the [blocks, K, D] partial buffers

template <typename T, bool LAPLACE>
__global__ void mixture_fwd_kernel(const T* __restrict z, const T* __restrict loc, const T* __restrict inv_scale,
                                   const T* __restrict constant, int64_t N, int64_t K, int64_t D, T* __restrict logp,
                                   T* __restrict resp, T* __restrict entropy) {
  const int lane = threadIdx.x % kWarp;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * (blockDim.x / kWarp) + threadIdx.x / kWarp;
  if (n >= N) return;  // n is the same for the whole warp
  const T* zn = z + n * D;
  T m = neg_inf<T>(), s = 0;
  for (int64_t k = 0; k < K; ++k) {
    const T c = constant[k];
    T j = neg_inf<T>();
    if (c != neg_inf<T>()) {
      T part = 0;
      for (int64_t d = lane; d < D; d += kWarp) {
        part += f_term<T, LAPLACE>((zn[d] - loc[k * D + d]) * inv_scale[k * D + d]);
      }
      part = warp_sum(part);
      j = c - (LAPLACE ? part : T(0.5) * part);
      lse_push(j, m, s);
    }
    if (resp != nullptr && lane == 0) resp[n * K + k] = j;
  }
  const T lp = m == neg_inf<T>() ? m : m + log(s);
  if (lane == 0) logp[n] = lp;
  if (resp == nullptr) return;
  __syncwarp();  // lane 0's joints are visible to the other lanes
  T h = 0;
  for (int64_t k = lane; k < K; k += kWarp) {
    const T j = resp[n * K + k];
    const T r = j == neg_inf<T>() ? T(0) : exp(j - lp);
    resp[n * K + k] = r;
    if (r > T(0)) h -= r * (j - lp);
  }
  h = warp_sum(h);
  if (lane == 0) entropy[n] = h;
}

template <typename T, bool LAPLACE, bool PARAMS>
__global__ void mixture_bwd_kernel(const T* __restrict z, const T* __restrict loc, const T* __restrict inv_scale,
                                   const T* __restrict constant, const T* __restrict grad, const T* __restrict logp,
                                   int64_t N, int64_t K, int64_t D, int64_t tile_rows, T* __restrict g_z,
                                   T* __restrict part_loc, T* __restrict part_scale, T* __restrict part_log_pi) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* zs = reinterpret_cast<T*>(smem_raw);  // [tile_rows, D]
  T* gzs = zs + tile_rows * D;             // [tile_rows, D]
  T* ws = gzs + tile_rows * D;             // [tile_rows]
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, warps = blockDim.x / kWarp;
  // Without PARAMS (no parameter gradient wanted) the partial buffers are null and never touched.
  T* pl = PARAMS ? part_loc + static_cast<int64_t>(blockIdx.x) * K * D : nullptr;
  T* ps = PARAMS ? part_scale + static_cast<int64_t>(blockIdx.x) * K * D : nullptr;
  T* pp = PARAMS ? part_log_pi + static_cast<int64_t>(blockIdx.x) * K : nullptr;

  const int64_t stride = static_cast<int64_t>(gridDim.x) * tile_rows;
  for (int64_t n0 = static_cast<int64_t>(blockIdx.x) * tile_rows; n0 < N; n0 += stride) {
    const int64_t rows = min(tile_rows, N - n0);
    for (int64_t i = threadIdx.x; i < tile_rows * D; i += blockDim.x) {
      zs[i] = i / D < rows ? z[n0 * D + i] : T(0);
      gzs[i] = 0;
    }
    __syncthreads();
    for (int64_t k = 0; k < K; ++k) {
      const T c = constant[k];
      if (c == neg_inf<T>()) continue;  // pruned cluster: exact zero gradients (uniform over the block)
      const T* mu = loc + k * D;
      const T* is = inv_scale + k * D;
      for (int64_t r = warp; r < tile_rows; r += warps) {
        T part = 0;
        if (r < rows) {
          for (int64_t d = lane; d < D; d += kWarp) part += f_term<T, LAPLACE>((zs[r * D + d] - mu[d]) * is[d]);
        }
        part = warp_sum(part);
        if (lane == 0) {
          const T j = c - (LAPLACE ? part : T(0.5) * part);
          ws[r] = r < rows ? grad[n0 + r] * exp(j - logp[n0 + r]) : T(0);
        }
      }
      __syncthreads();
      for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
        const T m_d = mu[d], is_d = is[d];
        T sum_loc = 0, sum_scale = 0;
        for (int64_t r = 0; r < rows; ++r) {
          const T w = ws[r];
          if (w == T(0)) continue;
          const T u = (zs[r * D + d] - m_d) * is_d;
          const T t = w * f_prime<T, LAPLACE>(u) * is_d;
          gzs[r * D + d] -= t;
          if constexpr (PARAMS) {
            sum_loc += t;
            sum_scale += w * ((LAPLACE ? (u < T(0) ? -u : u) : u * u) - T(1)) * is_d;
          }
        }
        if constexpr (PARAMS) {
          pl[k * D + d] += sum_loc;
          ps[k * D + d] += sum_scale;
        }
      }
      if (PARAMS && threadIdx.x == 0) {
        T sum_w = 0;
        for (int64_t r = 0; r < rows; ++r) sum_w += ws[r];
        pp[k] += sum_w;
      }
      __syncthreads();  // ws is rewritten for the next cluster
    }
    for (int64_t i = threadIdx.x; i < rows * D; i += blockDim.x) g_z[n0 * D + i] = gzs[i];
    __syncthreads();  // zs/gzs are rewritten for the next tile
  }
}

// out[i] = sum_b part[b, i] for i < size.
template <typename T>
__global__ void sum_partials_kernel(const T* __restrict part, int64_t blocks, int64_t size, T* __restrict out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= size) return;
  T acc = 0;
  for (int64_t b = 0; b < blocks; ++b) acc += part[b * size + i];
  out[i] = acc;
}

template <typename T>
void sum_partials(const at::Tensor& part, int64_t blocks, int64_t size, at::Tensor& out, cudaStream_t stream) {
  if (size == 0) return;
  sum_partials_kernel<T><<<static_cast<unsigned>(ceil_div(size, kThreads)), kThreads, 0, stream>>>(
      part.const_data_ptr<T>(), blocks, size, out.mutable_data_ptr<T>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> mixture_logpdf_fwd_cuda(const at::Tensor& z, const at::Tensor& loc,
                                                                       const at::Tensor& scale,
                                                                       const at::Tensor& log_pi, bool is_laplace,
                                                                       bool with_posterior) {
  const auto a = prepare_mixture("mixture_logpdf_fwd", z, loc, scale, log_pi);
  const c10::cuda::CUDAGuard guard(a.z.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const auto opts = a.z.options();
  auto logp = at::empty({a.N}, opts);
  auto resp = with_posterior ? at::empty({a.N, a.K}, opts) : at::empty({0}, opts);
  auto entropy = with_posterior ? at::empty({a.N}, opts) : at::empty({0}, opts);
  auto inv_scale = at::empty({a.K, a.D}, opts);
  auto constant = at::empty({a.K}, opts);
  AT_DISPATCH_FLOATING_TYPES(a.z.scalar_type(), "mixture_logpdf_fwd_cuda", [&] {
    using T = scalar_t;
    component_constants<T>(a.scale, a.log_pi.const_data_ptr<T>(), a.K, a.D, is_laplace, inv_scale, constant, stream);
    if (a.N == 0) return;
    const unsigned blocks = static_cast<unsigned>(ceil_div(a.N, kThreads / kWarp));
    T* r = with_posterior ? resp.mutable_data_ptr<T>() : nullptr;
    T* h = with_posterior ? entropy.mutable_data_ptr<T>() : nullptr;
    auto kernel = is_laplace ? mixture_fwd_kernel<T, true> : mixture_fwd_kernel<T, false>;
    kernel<<<blocks, kThreads, 0, stream>>>(a.z.const_data_ptr<T>(), a.loc.const_data_ptr<T>(),
                                            inv_scale.const_data_ptr<T>(), constant.const_data_ptr<T>(), a.N, a.K,
                                            a.D, logp.mutable_data_ptr<T>(), r, h);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {logp, resp, entropy};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> mixture_logpdf_bwd_cuda(
    const at::Tensor& grad_logp, const at::Tensor& z, const at::Tensor& loc, const at::Tensor& scale,
    const at::Tensor& log_pi, const at::Tensor& logp, bool is_laplace, bool need_z, bool need_params) {
  // g_z comes out of the same pass as the parameter terms, so need_z=false only drops it from the result;
  // need_params=false skips the parameter partials and their reduction.
  constexpr const char* op = "mixture_logpdf_bwd";
  const auto a = prepare_mixture(op, z, loc, scale, log_pi);
  const auto dtype = a.z.scalar_type();
  const auto g = prepare_row_vector(op, "grad_logp", grad_logp, a.N, dtype, a.z);
  const auto lp = prepare_row_vector(op, "logp", logp, a.N, dtype, a.z);
  const c10::cuda::CUDAGuard guard(a.z.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const auto opts = a.z.options();
  auto g_z = at::empty({a.N, a.D}, opts);
  auto g_loc = need_params ? at::zeros({a.K, a.D}, opts) : at::empty({0}, opts);
  auto g_scale = need_params ? at::zeros({a.K, a.D}, opts) : at::empty({0}, opts);
  auto g_log_pi = need_params ? at::zeros({a.K}, opts) : at::empty({0}, opts);
  auto inv_scale = at::empty({a.K, a.D}, opts);
  auto constant = at::empty({a.K}, opts);
  AT_DISPATCH_FLOATING_TYPES(dtype, "mixture_logpdf_bwd_cuda", [&] {
    using T = scalar_t;
    component_constants<T>(a.scale, a.log_pi.const_data_ptr<T>(), a.K, a.D, is_laplace, inv_scale, constant, stream);
    if (a.N == 0) return;
    const int64_t row_bytes = (2 * a.D + 1) * static_cast<int64_t>(sizeof(T));
    const int64_t tile_rows = std::min(kMaxTileRows, kTileSmemBytes / row_bytes);
    TORCH_CHECK(tile_rows >= 1, "cmvae_ext.", op, ": D = ", a.D, " is too large for the CUDA kernel's shared-memory ",
                "tile (at most ", kTileSmemBytes / (2 * sizeof(T)) - 1, " dims); use the triton or torch backend");
    const int64_t tiles = ceil_div(a.N, tile_rows);
    const int64_t slice_bytes = (2 * a.K * a.D + a.K) * static_cast<int64_t>(sizeof(T));
    const int64_t blocks = std::max<int64_t>(
        1, std::min({tiles, static_cast<int64_t>(2 * sm_count(a.z)), kPartialBytes / slice_bytes}));
    const int64_t parts = need_params ? blocks : 0;
    auto part_loc = at::zeros({parts, a.K, a.D}, opts);
    auto part_scale = at::zeros({parts, a.K, a.D}, opts);
    auto part_log_pi = at::zeros({parts, a.K}, opts);
    const size_t smem = static_cast<size_t>(tile_rows * row_bytes);
    auto kernel = is_laplace ? (need_params ? mixture_bwd_kernel<T, true, true> : mixture_bwd_kernel<T, true, false>)
                             : (need_params ? mixture_bwd_kernel<T, false, true> : mixture_bwd_kernel<T, false, false>);
    kernel<<<static_cast<unsigned>(blocks), kThreads, smem, stream>>>(
        a.z.const_data_ptr<T>(), a.loc.const_data_ptr<T>(), inv_scale.const_data_ptr<T>(),
        constant.const_data_ptr<T>(), g.const_data_ptr<T>(), lp.const_data_ptr<T>(), a.N, a.K, a.D, tile_rows,
        g_z.mutable_data_ptr<T>(), need_params ? part_loc.mutable_data_ptr<T>() : nullptr,
        need_params ? part_scale.mutable_data_ptr<T>() : nullptr,
        need_params ? part_log_pi.mutable_data_ptr<T>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (!need_params) return;
    sum_partials<T>(part_loc, blocks, a.K * a.D, g_loc, stream);
    sum_partials<T>(part_scale, blocks, a.K * a.D, g_scale, stream);
    sum_partials<T>(part_log_pi, blocks, a.K, g_log_pi, stream);
  });
  return {need_z ? g_z : at::empty({0}, opts), g_loc, g_scale, g_log_pi};
}

}  // namespace
}  // namespace cmvae_ext::cuda

TORCH_LIBRARY_IMPL(cmvae_ext, CUDA, m) {
  m.impl("mixture_logpdf_fwd", &cmvae_ext::cuda::mixture_logpdf_fwd_cuda);
  m.impl("mixture_logpdf_bwd", &cmvae_ext::cuda::mixture_logpdf_bwd_cuda);
}
