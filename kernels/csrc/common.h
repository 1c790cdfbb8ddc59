// Shared by the CPU (.cpp) and CUDA (.cu) backends: argument checks, dtype rules and the per-cluster constants.
//
// Dtype rule of the op contract: float32/float64 are computed in their own precision; bfloat16/float16 inputs are
// upcast and computed (and returned) in float32. Every op checks its arguments here, so both backends reject bad
// input with the same message.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <initializer_list>
#include <utility>

namespace cmvae_ext {

constexpr double kLog2 = 0.69314718055994530942;
constexpr double kHalfLog2Pi = 0.91893853320467274178;

inline bool is_low_precision(at::ScalarType t) {
  return t == at::kBFloat16 || t == at::kHalf;
}

// The dtype an op computes in for inputs of dtype t: float64 stays, everything else is float32.
inline at::ScalarType compute_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_floating(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.defined(), "cmvae_ext.", op, ": argument '", name, "' is undefined");
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), "cmvae_ext.", op, ": '", name,
              "' must be a floating tensor (float32/float64, or bfloat16/float16 to compute in float32), got ",
              t.scalar_type());
}

inline void check_dim(const at::Tensor& t, int64_t dim, const char* op, const char* name, const char* layout) {
  TORCH_CHECK(t.dim() == dim, "cmvae_ext.", op, ": '", name, "' must have shape ", layout, ", got ", t.sizes());
}

inline void check_same_device(std::initializer_list<std::pair<const char*, const at::Tensor*>> ts, const char* op) {
  const at::Tensor& first = *ts.begin()->second;
  for (const auto& [name, t] : ts) {
    TORCH_CHECK(t->device() == first.device(), "cmvae_ext.", op, ": '", name, "' is on ", t->device(), " but '",
                ts.begin()->first, "' is on ", first.device(), "; move all arguments to one device");
  }
}

// Contiguous copy in the compute dtype (no copy when it already is one).
inline at::Tensor prepare(const at::Tensor& t, at::ScalarType dtype) {
  return t.to(dtype).contiguous();
}

// The dtype shared by a group of floating arguments: the promoted type, with low precision upcast to float32.
inline at::ScalarType group_dtype(std::initializer_list<const at::Tensor*> ts) {
  at::ScalarType t = (*ts.begin())->scalar_type();
  for (const at::Tensor* x : ts) t = c10::promoteTypes(t, x->scalar_type());
  return compute_dtype(t);
}

// Per-component constant of a diagonal Laplace/Normal log-density, sum_d of the scale-only terms:
// Laplace -sum_d log(2 s_d); Normal -sum_d (log s_d + 0.5 log 2pi).
template <typename T>
inline T scale_constant(const T* scale, int64_t D, bool is_laplace) {
  T acc = 0;
  for (int64_t d = 0; d < D; ++d) acc += std::log(scale[d]);
  const T per_dim = static_cast<T>(is_laplace ? kLog2 : kHalfLog2Pi);
  return -acc - per_dim * static_cast<T>(D);
}

}  // namespace cmvae_ext
