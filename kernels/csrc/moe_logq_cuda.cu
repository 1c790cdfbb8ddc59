// Mixture-of-experts posterior density on CUDA: the same math as moe_logq_cpu.cpp (see there).
// One warp per row (m, s, b); lanes split d and a shuffle reduction gives lq[e]. The backward updates the row's
// own g_z directly and adds the parameter gradients with atomicAdd into g_loc/g_scale [E, B, D]: each (e, b, d)
// receives only M*S contributions (50 at the training shapes), so contention is low and no partial buffers are
// needed. Summation order, hence the last bits of g_loc/g_scale, can vary between runs.
#include "cuda_common.cuh"

#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

namespace cmvae_ext::cuda {
namespace {


// lq for row i against expert slot eb (= e * B + b); every lane gets the value.
template <typename T, bool LAPLACE>
__device__ __forceinline__ T expert_logq(const T* zi, const T* loc, const T* inv_scale, const T* constant, int64_t eb,
                                         int64_t D, int lane) {
  T part = 0;
  for (int64_t d = lane; d < D; d += kWarp) {
    part += f_term<T, LAPLACE>((zi[d] - loc[eb * D + d]) * inv_scale[eb * D + d]);
  }
  part = warp_sum(part);
  return constant[eb] - (LAPLACE ? part : T(0.5) * part);
}

template <typename T, bool LAPLACE>
__global__ void moe_fwd_kernel(const T* __restrict z, const T* __restrict loc, const T* __restrict inv_scale,
                               const T* __restrict constant, int64_t rows, int64_t B, int64_t E, int64_t D,
                               T* __restrict out) {
  const int lane = threadIdx.x % kWarp;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * (blockDim.x / kWarp) + threadIdx.x / kWarp;
  if (i >= rows) return;  // uniform over the warp
  const int64_t b = i % B;
  T m = neg_inf<T>(), s = 0;
  for (int64_t e = 0; e < E; ++e) {
    lse_push(expert_logq<T, LAPLACE>(z + i * D, loc, inv_scale, constant, e * B + b, D, lane), m, s);
  }
  if (lane == 0) out[i] = m == neg_inf<T>() ? m : m + log(s) - log(static_cast<T>(E));
}

template <typename T, bool LAPLACE, bool PARAMS>
__global__ void moe_bwd_kernel(const T* __restrict z, const T* __restrict loc, const T* __restrict inv_scale,
                               const T* __restrict constant, const T* __restrict grad, const T* __restrict out,
                               int64_t rows, int64_t B, int64_t E, int64_t D, T* __restrict g_z, T* __restrict g_loc,
                               T* __restrict g_scale) {
  const int lane = threadIdx.x % kWarp;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * (blockDim.x / kWarp) + threadIdx.x / kWarp;
  if (i >= rows) return;
  const int64_t b = i % B;
  const T* zi = z + i * D;
  T* gz = g_z + i * D;
  for (int64_t d = lane; d < D; d += kWarp) gz[d] = 0;
  if (out[i] == neg_inf<T>()) return;
  const T log_e = log(static_cast<T>(E));
  for (int64_t e = 0; e < E; ++e) {
    const int64_t eb = e * B + b;
    const T lq = expert_logq<T, LAPLACE>(zi, loc, inv_scale, constant, eb, D, lane);
    const T w = grad[i] * exp(lq - log_e - out[i]);
    if (w == T(0)) continue;  // uniform over the warp
    for (int64_t d = lane; d < D; d += kWarp) {
      const T is_d = inv_scale[eb * D + d];
      const T u = (zi[d] - loc[eb * D + d]) * is_d;
      const T t = w * f_prime<T, LAPLACE>(u) * is_d;
      gz[d] -= t;
      if constexpr (PARAMS) {  // detached experts (DReG): no atomics at all
        atomicAdd(g_loc + eb * D + d, t);
        atomicAdd(g_scale + eb * D + d, w * ((LAPLACE ? (u < T(0) ? -u : u) : u * u) - T(1)) * is_d);
      }
    }
  }
}

at::Tensor moe_logq_fwd_cuda(const at::Tensor& z, const at::Tensor& loc, const at::Tensor& scale, bool is_laplace) {
  const auto a = prepare_moe("moe_logq_fwd", z, loc, scale);
  const c10::cuda::CUDAGuard guard(a.z.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const auto opts = a.z.options();
  auto out = at::empty({a.M, a.S, a.B}, opts);
  auto inv_scale = at::empty({a.E, a.B, a.D}, opts);
  auto constant = at::empty({a.E, a.B}, opts);
  const int64_t rows = a.M * a.S * a.B;
  AT_DISPATCH_FLOATING_TYPES(a.z.scalar_type(), "moe_logq_fwd_cuda", [&] {
    using T = scalar_t;
    component_constants<T>(a.scale, nullptr, a.E * a.B, a.D, is_laplace, inv_scale, constant, stream);
    if (rows == 0) return;
    auto kernel = is_laplace ? moe_fwd_kernel<T, true> : moe_fwd_kernel<T, false>;
    kernel<<<static_cast<unsigned>(ceil_div(rows, kThreads / kWarp)), kThreads, 0, stream>>>(
        a.z.const_data_ptr<T>(), a.loc.const_data_ptr<T>(), inv_scale.const_data_ptr<T>(),
        constant.const_data_ptr<T>(), rows, a.B, a.E, a.D, out.mutable_data_ptr<T>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> moe_logq_bwd_cuda(const at::Tensor& grad_out, const at::Tensor& z,
                                                                 const at::Tensor& loc, const at::Tensor& scale,
                                                                 const at::Tensor& out, bool is_laplace,
                                                                 bool need_params) {
  constexpr const char* op = "moe_logq_bwd";
  const auto a = prepare_moe(op, z, loc, scale);
  const auto dtype = a.z.scalar_type();
  const auto shape = std::vector<int64_t>{a.M, a.S, a.B};
  const auto g = prepare_same_shape(op, "grad_out", grad_out, shape, dtype, a.z);
  const auto o = prepare_same_shape(op, "out", out, shape, dtype, a.z);
  const c10::cuda::CUDAGuard guard(a.z.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const auto opts = a.z.options();
  auto g_z = at::empty({a.M, a.S, a.B, a.D}, opts);
  auto g_loc = need_params ? at::zeros({a.E, a.B, a.D}, opts) : at::empty({0}, opts);
  auto g_scale = need_params ? at::zeros({a.E, a.B, a.D}, opts) : at::empty({0}, opts);
  auto inv_scale = at::empty({a.E, a.B, a.D}, opts);
  auto constant = at::empty({a.E, a.B}, opts);
  const int64_t rows = a.M * a.S * a.B;
  AT_DISPATCH_FLOATING_TYPES(dtype, "moe_logq_bwd_cuda", [&] {
    using T = scalar_t;
    component_constants<T>(a.scale, nullptr, a.E * a.B, a.D, is_laplace, inv_scale, constant, stream);
    if (rows == 0) return;
    auto kernel = is_laplace ? (need_params ? moe_bwd_kernel<T, true, true> : moe_bwd_kernel<T, true, false>)
                             : (need_params ? moe_bwd_kernel<T, false, true> : moe_bwd_kernel<T, false, false>);
    kernel<<<static_cast<unsigned>(ceil_div(rows, kThreads / kWarp)), kThreads, 0, stream>>>(
        a.z.const_data_ptr<T>(), a.loc.const_data_ptr<T>(), inv_scale.const_data_ptr<T>(),
        constant.const_data_ptr<T>(), g.const_data_ptr<T>(), o.const_data_ptr<T>(), rows, a.B, a.E, a.D,
        g_z.mutable_data_ptr<T>(), need_params ? g_loc.mutable_data_ptr<T>() : nullptr,
        need_params ? g_scale.mutable_data_ptr<T>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {g_z, g_loc, g_scale};
}

}  // namespace
}  // namespace cmvae_ext::cuda

TORCH_LIBRARY_IMPL(cmvae_ext, CUDA, m) {
  m.impl("moe_logq_fwd", &cmvae_ext::cuda::moe_logq_fwd_cuda);
  m.impl("moe_logq_bwd", &cmvae_ext::cuda::moe_logq_bwd_cuda);
}
