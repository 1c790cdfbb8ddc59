// Argument checks and preparation per op, shared by the CPU and CUDA backends: shapes as in the op contract,
// one device, contiguous tensors in the compute dtype (float32 for low-precision inputs).
#pragma once

#include "common.h"

namespace cmvae_ext {

struct MixtureArgs {
  at::Tensor z, loc, scale, log_pi;
  int64_t N, K, D;
};

inline MixtureArgs prepare_mixture(const char* op, const at::Tensor& z, const at::Tensor& loc,
                                   const at::Tensor& scale, const at::Tensor& log_pi) {
  check_floating(z, op, "z");
  check_floating(loc, op, "loc");
  check_floating(scale, op, "scale");
  check_floating(log_pi, op, "log_pi");
  check_dim(z, 2, op, "z", "[N, D]");
  check_dim(loc, 2, op, "loc", "[K, D]");
  check_dim(log_pi, 1, op, "log_pi", "[K]");
  TORCH_CHECK(scale.sizes() == loc.sizes(), "cmvae_ext.", op, ": 'scale' must have the shape of 'loc' ",
              loc.sizes(), ", got ", scale.sizes());
  TORCH_CHECK(loc.size(1) == z.size(1), "cmvae_ext.", op, ": 'loc' is [K, D] with D = ", loc.size(1),
              " but 'z' has D = ", z.size(1));
  TORCH_CHECK(log_pi.size(0) == loc.size(0), "cmvae_ext.", op, ": 'log_pi' has ", log_pi.size(0),
              " entries but 'loc' has K = ", loc.size(0), " rows");
  TORCH_CHECK(loc.size(0) >= 1, "cmvae_ext.", op, ": the mixture needs at least one component (K >= 1)");
  check_same_device({{"z", &z}, {"loc", &loc}, {"scale", &scale}, {"log_pi", &log_pi}}, op);
  const auto dtype = group_dtype({&z, &loc, &scale, &log_pi});
  return {prepare(z, dtype), prepare(loc, dtype), prepare(scale, dtype), prepare(log_pi, dtype),
          z.size(0), loc.size(0), z.size(1)};
}

inline at::Tensor prepare_row_vector(const char* op, const char* name, const at::Tensor& t, int64_t n,
                                     at::ScalarType dtype, const at::Tensor& like) {
  check_floating(t, op, name);
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, "cmvae_ext.", op, ": '", name, "' must have shape [", n, "], got ",
              t.sizes());
  TORCH_CHECK(t.device() == like.device(), "cmvae_ext.", op, ": '", name, "' is on ", t.device(),
              " but the inputs are on ", like.device());
  return prepare(t, dtype);
}

struct MoeArgs {
  at::Tensor z, loc, scale;
  int64_t M, S, B, E, D;
};

inline MoeArgs prepare_moe(const char* op, const at::Tensor& z, const at::Tensor& loc, const at::Tensor& scale) {
  check_floating(z, op, "z");
  check_floating(loc, op, "loc");
  check_floating(scale, op, "scale");
  check_dim(z, 4, op, "z", "[M, S, B, D]");
  check_dim(loc, 3, op, "loc", "[E, B, D]");
  TORCH_CHECK(scale.sizes() == loc.sizes(), "cmvae_ext.", op, ": 'scale' must have the shape of 'loc' ",
              loc.sizes(), ", got ", scale.sizes());
  TORCH_CHECK(loc.size(1) == z.size(2) && loc.size(2) == z.size(3), "cmvae_ext.", op,
              ": 'loc' [E, B, D] must match 'z' [M, S, B, D] in B and D, got ", loc.sizes(), " and ", z.sizes());
  TORCH_CHECK(loc.size(0) >= 1, "cmvae_ext.", op, ": the mixture of experts needs at least one expert (E >= 1)");
  check_same_device({{"z", &z}, {"loc", &loc}, {"scale", &scale}}, op);
  const auto dtype = group_dtype({&z, &loc, &scale});
  return {prepare(z, dtype), prepare(loc, dtype), prepare(scale, dtype),
          z.size(0), z.size(1), z.size(2), loc.size(0), z.size(3)};
}

inline at::Tensor prepare_same_shape(const char* op, const char* name, const at::Tensor& t, at::IntArrayRef shape,
                                     at::ScalarType dtype, const at::Tensor& like) {
  check_floating(t, op, name);
  TORCH_CHECK(t.sizes() == shape, "cmvae_ext.", op, ": '", name, "' must have shape ", shape, ", got ", t.sizes());
  TORCH_CHECK(t.device() == like.device(), "cmvae_ext.", op, ": '", name, "' is on ", t.device(),
              " but the inputs are on ", like.device());
  return prepare(t, dtype);
}

// image_loglik keeps pred in its own dtype (bf16/fp16 are read as such and accumulated in float32: pred is the
// large tensor); target [B, P] is small and is converted to the accumulation dtype.
struct ImageArgs {
  at::Tensor pred, target;
  int64_t R, B, P;
  at::ScalarType acc_dtype;
};

inline ImageArgs prepare_image(const char* op, const at::Tensor& pred, const at::Tensor& target, double scale) {
  check_floating(pred, op, "pred");
  check_floating(target, op, "target");
  check_dim(pred, 3, op, "pred", "[R, B, P]");
  check_dim(target, 2, op, "target", "[B, P]");
  TORCH_CHECK(pred.size(1) == target.size(0) && pred.size(2) == target.size(1), "cmvae_ext.", op,
              ": 'pred' [R, B, P] must match 'target' [B, P], got ", pred.sizes(), " and ", target.sizes());
  TORCH_CHECK(std::isfinite(scale) && scale > 0, "cmvae_ext.", op, ": 'scale' must be a positive finite float, got ",
              scale);
  check_same_device({{"pred", &pred}, {"target", &target}}, op);
  const auto acc = compute_dtype(pred.scalar_type());
  return {pred.contiguous(), prepare(target, acc), pred.size(0), pred.size(1), pred.size(2), acc};
}

}  // namespace cmvae_ext
