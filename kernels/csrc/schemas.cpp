// The extension's op schemas, written once. Each backend file registers implementations for its dispatch key
// (CPU in *_cpu.cpp, CUDA in *_cuda.cu). The public ops (namespace `cmvae`, with autograd and fake tensors) are
// defined in Python and call these forward/backward pairs; the math of each is in the matching kernels/<op>.py.
// The backwards take which gradients are wanted (autograd's needs_input_grad): a skipped one comes back empty [0].
#include <torch/library.h>

TORCH_LIBRARY(cmvae_ext, m) {
  m.def("mixture_logpdf_fwd(Tensor z, Tensor loc, Tensor scale, Tensor log_pi, bool is_laplace, "
        "bool with_posterior) -> (Tensor logp, Tensor resp, Tensor entropy)");
  m.def("mixture_logpdf_bwd(Tensor grad_logp, Tensor z, Tensor loc, Tensor scale, Tensor log_pi, Tensor logp, "
        "bool is_laplace, bool need_z=True, bool need_params=True) -> (Tensor g_z, Tensor g_loc, Tensor g_scale, "
        "Tensor g_log_pi)");
  m.def("moe_logq_fwd(Tensor z, Tensor loc, Tensor scale, bool is_laplace) -> Tensor");
  m.def("moe_logq_bwd(Tensor grad_out, Tensor z, Tensor loc, Tensor scale, Tensor out, bool is_laplace, "
        "bool need_params=True) -> (Tensor g_z, Tensor g_loc, Tensor g_scale)");
  m.def("importance_weights_fwd(Tensor lw) -> (Tensor bound, Tensor weights, Tensor sq_weights)");
  m.def("importance_weights_bwd(Tensor grad_bound, Tensor weights) -> Tensor");
  m.def("image_loglik_fwd(Tensor pred, Tensor target, float scale, bool is_laplace) -> Tensor");
  m.def("image_loglik_bwd(Tensor grad_out, Tensor pred, Tensor target, float scale, bool is_laplace) -> Tensor");
}
