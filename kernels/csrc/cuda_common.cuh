// Helpers shared by the CUDA kernels: reductions, the per-element log-density term, launch plumbing.
// Only c10/cuda headers are used (not ATen/cuda), so the files also compile against a CPU-only torch wheel, which
// ships those headers but not the CUDA libraries (see CMVAE_CUDA_SYNTAX_CHECK in CMakeLists.txt).
#pragma once

#include "args.h"

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <limits>

namespace cmvae_ext::cuda {

constexpr int kWarp = 32;
constexpr int kThreads = 256;  // threads per block of every kernel here

template <typename T>
__device__ __forceinline__ T neg_inf() {
  return -std::numeric_limits<T>::infinity();
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;  // every lane holds the total
}

// Sum over the block; `scratch` holds one value per warp. Every thread must call it; all get the total.
template <typename T>
__device__ __forceinline__ T block_sum(T v, T* scratch) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, warps = blockDim.x / kWarp;
  v = warp_sum(v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  T total = 0;
  for (int i = 0; i < warps; ++i) total += scratch[i];
  __syncthreads();  // scratch may be reused right after
  return total;
}

// f(u): |u| (Laplace) or u^2 (Normal; the 1/2 is applied once to the sum).
template <typename T, bool LAPLACE>
__device__ __forceinline__ T f_term(T u) {
  return LAPLACE ? (u < T(0) ? -u : u) : u * u;
}

// f'(u): sign(u) with sign(0) = 0 (Laplace) or u (Normal).
template <typename T, bool LAPLACE>
__device__ __forceinline__ T f_prime(T u) {
  return LAPLACE ? static_cast<T>(u > T(0)) - static_cast<T>(u < T(0)) : u;
}

// Online logsumexp step: running max m and sum s of exp(x - m).
template <typename T>
__device__ __forceinline__ void lse_push(T x, T& m, T& s) {
  if (x == neg_inf<T>()) return;
  if (x > m) {
    s = (m == neg_inf<T>() ? T(0) : s * exp(m - x)) + T(1);
    m = x;
  } else {
    s += exp(x - m);
  }
}

// Per-component scale constants: inv_scale = 1/s and constant[c] = offset[c] - sum_d log s_cd - D * per_dim
// (per_dim = log 2 for Laplace, log(2pi)/2 for Normal); offset is log_pi, or null for 0. One thread per component.
template <typename T>
__global__ void component_constants_kernel(const T* __restrict scale, const T* __restrict offset, int64_t C,
                                           int64_t D, T per_dim, T* __restrict inv_scale, T* __restrict constant) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  T acc = 0;
  for (int64_t d = 0; d < D; ++d) {
    const T s = scale[c * D + d];
    inv_scale[c * D + d] = T(1) / s;
    acc += log(s);
  }
  constant[c] = (offset == nullptr ? T(0) : offset[c]) - acc - per_dim * static_cast<T>(D);
}

inline int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

inline int sm_count(const at::Tensor& t) {
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, t.get_device()));
  return count;
}

// Launches component_constants_kernel for C components of D dims.
template <typename T>
void component_constants(const at::Tensor& scale, const T* offset, int64_t C, int64_t D, bool is_laplace,
                         at::Tensor& inv_scale, at::Tensor& constant, cudaStream_t stream) {
  if (C == 0) return;
  constexpr int threads = 128;
  const T per_dim = static_cast<T>(is_laplace ? kLog2 : kHalfLog2Pi);
  component_constants_kernel<T><<<static_cast<unsigned>(ceil_div(C, threads)), threads, 0, stream>>>(
      scale.const_data_ptr<T>(), offset, C, D, per_dim, inv_scale.mutable_data_ptr<T>(),
      constant.mutable_data_ptr<T>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace cmvae_ext::cuda
