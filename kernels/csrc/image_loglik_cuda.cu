// Image log-likelihood summed over pixels on CUDA: the same math as image_loglik_cpu.cpp (see there).
// Forward: one block per (r, b) row, threads split the pixels, float32 (float64 for float64 pred) block reduction;
// the target row is read by every r (cache-resident), never copied. Backward: one thread per element.
#include "cuda_common.cuh"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

namespace cmvae_ext::cuda {
namespace {


template <typename T, typename A, bool LAPLACE>
__global__ void image_fwd_kernel(const T* __restrict pred, const A* __restrict target, int64_t B, int64_t P, A inv_s,
                                 A constant, A* __restrict out) {
  __shared__ A scratch[kThreads / kWarp];
  const int64_t i = blockIdx.x;
  const T* x = pred + i * P;
  const A* t = target + (i % B) * P;
  A acc = 0;
  for (int64_t p = threadIdx.x; p < P; p += blockDim.x) {
    acc += f_term<A, LAPLACE>((t[p] - static_cast<A>(x[p])) * inv_s);
  }
  acc = block_sum(acc, scratch);
  if (threadIdx.x == 0) out[i] = -(LAPLACE ? acc : A(0.5) * acc) - constant;
}

template <typename T, typename A, bool LAPLACE>
__global__ void image_bwd_kernel(const A* __restrict grad, const T* __restrict pred, const A* __restrict target,
                                 int64_t B, int64_t P, int64_t size, A inv_s, T* __restrict out) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < size;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = i / P, p = i % P;
    const A u = (target[(row % B) * P + p] - static_cast<A>(pred[i])) * inv_s;
    out[i] = static_cast<T>(grad[row] * f_prime<A, LAPLACE>(u) * inv_s);
  }
}

at::Tensor image_loglik_fwd_cuda(const at::Tensor& pred, const at::Tensor& target, double scale, bool is_laplace) {
  const auto a = prepare_image("image_loglik_fwd", pred, target, scale);
  const c10::cuda::CUDAGuard guard(a.pred.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  auto out = at::empty({a.R, a.B}, a.pred.options().dtype(a.acc_dtype));
  const int64_t rows = a.R * a.B;
  if (rows == 0) return out;
  TORCH_CHECK(rows <= std::numeric_limits<int32_t>::max(), "cmvae_ext.image_loglik_fwd: R*B = ", rows,
              " rows exceed the CUDA grid limit");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.pred.scalar_type(), "image_loglik_fwd_cuda", [&] {
    using A = at::opmath_type<scalar_t>;
    const A inv_s = static_cast<A>(1.0 / scale);
    const A constant = static_cast<A>(a.P) * static_cast<A>(is_laplace ? std::log(2.0 * scale)
                                                                        : std::log(scale) + kHalfLog2Pi);
    auto kernel = is_laplace ? image_fwd_kernel<scalar_t, A, true> : image_fwd_kernel<scalar_t, A, false>;
    kernel<<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(a.pred.const_data_ptr<scalar_t>(),
                                                                 a.target.const_data_ptr<A>(), a.B, a.P, inv_s,
                                                                 constant, out.mutable_data_ptr<A>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor image_loglik_bwd_cuda(const at::Tensor& grad_out, const at::Tensor& pred, const at::Tensor& target,
                                 double scale, bool is_laplace) {
  constexpr const char* op = "image_loglik_bwd";
  const auto a = prepare_image(op, pred, target, scale);
  const auto g = prepare_same_shape(op, "grad_out", grad_out, {a.R, a.B}, a.acc_dtype, a.pred);
  const c10::cuda::CUDAGuard guard(a.pred.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  auto g_pred = at::empty_like(a.pred);
  const int64_t size = a.pred.numel();
  if (size == 0) return g_pred;
  const auto blocks = static_cast<unsigned>(std::min<int64_t>(ceil_div(size, kThreads), 65535));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.pred.scalar_type(), "image_loglik_bwd_cuda", [&] {
    using A = at::opmath_type<scalar_t>;
    const A inv_s = static_cast<A>(1.0 / scale);
    auto kernel = is_laplace ? image_bwd_kernel<scalar_t, A, true> : image_bwd_kernel<scalar_t, A, false>;
    kernel<<<blocks, kThreads, 0, stream>>>(g.const_data_ptr<A>(), a.pred.const_data_ptr<scalar_t>(),
                                            a.target.const_data_ptr<A>(), a.B, a.P, size, inv_s,
                                            g_pred.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return g_pred;
}

}  // namespace
}  // namespace cmvae_ext::cuda

TORCH_LIBRARY_IMPL(cmvae_ext, CUDA, m) {
  m.impl("image_loglik_fwd", &cmvae_ext::cuda::image_loglik_fwd_cuda);
  m.impl("image_loglik_bwd", &cmvae_ext::cuda::image_loglik_bwd_cuda);
}
