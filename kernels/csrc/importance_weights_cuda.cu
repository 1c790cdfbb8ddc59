// IWAE bound and importance weights on CUDA: the same math as importance_weights_cpu.cpp (see there).
// One thread per datapoint b: consecutive threads read consecutive b, the contiguous axis of lw [M, S, B].
#include "cuda_common.cuh"

#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

namespace cmvae_ext::cuda {
namespace {


template <typename T>
__global__ void iw_fwd_kernel(const T* __restrict lw, int64_t M, int64_t S, int64_t B, T* __restrict bound,
                              T* __restrict weights, T* __restrict sq) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= B) return;
  const T log_s = log(static_cast<T>(S));
  T acc = 0;
  for (int64_t m = 0; m < M; ++m) {
    const T* x = lw + m * S * B + b;
    T mx = neg_inf<T>();
    for (int64_t s = 0; s < S; ++s) mx = max(mx, x[s * B]);
    T sum = 0;
    if (mx != neg_inf<T>()) {
      for (int64_t s = 0; s < S; ++s) sum += exp(x[s * B] - mx);
    }
    acc += (mx == neg_inf<T>() ? mx : mx + log(sum)) - log_s;
    const T inv_sum = T(1) / sum;
    for (int64_t s = 0; s < S; ++s) {
      const T v = exp(x[s * B] - mx) * inv_sum;  // NaN when the whole row is -inf, as torch.softmax
      weights[m * S * B + s * B + b] = v;
      sq[m * S * B + s * B + b] = v * v;
    }
  }
  bound[b] = acc / static_cast<T>(M);
}

template <typename T>
__global__ void iw_bwd_kernel(const T* __restrict grad, const T* __restrict weights, int64_t M, int64_t B,
                              int64_t size, T* __restrict out) {
  const T inv_m = T(1) / static_cast<T>(M);
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < size;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    out[i] = grad[i % B] * weights[i] * inv_m;
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> importance_weights_fwd_cuda(const at::Tensor& lw) {
  constexpr const char* op = "importance_weights_fwd";
  check_floating(lw, op, "lw");
  check_dim(lw, 3, op, "lw", "[M, S, B]");
  TORCH_CHECK(lw.size(0) >= 1 && lw.size(1) >= 1, "cmvae_ext.", op,
              ": 'lw' [M, S, B] needs M >= 1 and S >= 1, got ", lw.sizes());
  const auto x = prepare(lw, compute_dtype(lw.scalar_type()));
  const int64_t M = x.size(0), S = x.size(1), B = x.size(2);
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  auto bound = at::empty({B}, x.options());
  auto weights = at::empty_like(x);
  auto sq = at::empty_like(x);
  if (B == 0) return {bound, weights, sq};
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "importance_weights_fwd_cuda", [&] {
    iw_fwd_kernel<scalar_t><<<static_cast<unsigned>(ceil_div(B, kThreads)), kThreads, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), M, S, B, bound.mutable_data_ptr<scalar_t>(),
        weights.mutable_data_ptr<scalar_t>(), sq.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {bound, weights, sq};
}

at::Tensor importance_weights_bwd_cuda(const at::Tensor& grad_bound, const at::Tensor& weights) {
  constexpr const char* op = "importance_weights_bwd";
  check_floating(weights, op, "weights");
  check_dim(weights, 3, op, "weights", "[M, S, B]");
  const auto dtype = compute_dtype(weights.scalar_type());
  const auto w = prepare(weights, dtype);
  const int64_t M = w.size(0), B = w.size(2);
  const auto g = prepare_row_vector(op, "grad_bound", grad_bound, B, dtype, w);
  const c10::cuda::CUDAGuard guard(w.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  auto out = at::empty_like(w);
  const int64_t size = w.numel();
  if (size == 0) return out;
  const auto blocks = static_cast<unsigned>(std::min<int64_t>(ceil_div(size, kThreads), 65535));
  AT_DISPATCH_FLOATING_TYPES(dtype, "importance_weights_bwd_cuda", [&] {
    iw_bwd_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(g.const_data_ptr<scalar_t>(),
                                                             w.const_data_ptr<scalar_t>(), M, B, size,
                                                             out.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace
}  // namespace cmvae_ext::cuda

TORCH_LIBRARY_IMPL(cmvae_ext, CUDA, m) {
  m.impl("importance_weights_fwd", &cmvae_ext::cuda::importance_weights_fwd_cuda);
  m.impl("importance_weights_bwd", &cmvae_ext::cuda::importance_weights_bwd_cuda);
}
