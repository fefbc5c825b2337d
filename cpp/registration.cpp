// Every lowrank_ops schema, declared once.  Kernels register per backend in
// their own files (TORCH_LIBRARY_IMPL); fakes and autograd live in the Python
// module named by set_python_module, which must be the module that registers them.
#include <torch/library.h>


TORCH_LIBRARY_FRAGMENT(lowrank_ops, m) {
  m.set_python_module("lowrank_ops.ops.lowrank");
  // y = (x·Wᵀ + scale·((x·downᵀ)·coreᵀ)·upᵀ) ⊙ out_scale + bias
  // x (..., in), weight (out, in), bias (out), down (r_d, in), up (out, r_u),
  // core None | (r,) diagonal | (r_u, r_d); out_scale (out).  LoRA (Hu et al. 2021),
  // DoRA (Liu et al. 2024, out_scale = m/‖W+s·up·down‖), VeRA, SVFT-style cores.
  m.def("lowrank_linear(Tensor x, Tensor? weight, Tensor? bias, Tensor down, Tensor up, "
        "Tensor? core=None, float scale=1.0, Tensor? out_scale=None) -> Tensor");
  // Gradients of lowrank_linear for the inputs selected by output_mask
  // (x, weight, bias, down, up, core, out_scale); unselected ones are empty tensors.
  m.def("lowrank_linear_backward(Tensor grad, Tensor x, Tensor? weight, Tensor down, Tensor up, "
        "Tensor? core, float scale, Tensor? out_scale, bool[7] output_mask) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // n_j = ‖W_j + scale·up_j·down‖₂ by the factored identity
  // ‖W‖² + 2s·rowsum((W·downᵀ)⊙up) + s²·rowsum((up·(down·downᵀ))⊙up); never forms up·down.
  // weight_norm_sq: optional cached rowsum(W⊙W) (out) for a frozen W.
  m.def("dora_norm(Tensor weight, Tensor down, Tensor up, float scale, Tensor? weight_norm_sq=None) -> Tensor");
  // DoRA (Liu et al. 2024, Eq. 5) in one call with one pass over W:
  // y = (magnitude / n) ⊙ (x·Wᵀ + scale·x·downᵀ·upᵀ) + bias, n = ‖W + scale·up·down‖ per row.
  // Returns (y, pre_scale, n); the norm is a constant in y's backward (paper §4.3, as peft).
  m.def("dora_linear(Tensor x, Tensor weight, Tensor? bias, Tensor down, Tensor up, Tensor magnitude, "
        "float scale=1.0, Tensor? weight_norm_sq=None) -> (Tensor, Tensor, Tensor)");
  // Gradients of dora_linear's y for (x, weight, bias, down, up, magnitude) selected by output_mask.
  m.def("dora_linear_backward(Tensor grad, Tensor x, Tensor weight, Tensor down, Tensor up, Tensor magnitude, "
        "float scale, Tensor pre_scale, Tensor norm, bool[6] output_mask) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Gradients of dora_norm for (weight, down, up) selected by output_mask.
  m.def("dora_norm_backward(Tensor grad, Tensor norm, Tensor weight, Tensor down, Tensor up, float scale, "
        "bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_FRAGMENT(lowrank_ops, m) {
  m.set_python_module("lowrank_ops.ops.linalg");
  // A (..., m, n) ≈ U (..., m, rank) · diag(S (..., rank)) · Vh (..., rank, n): randomized truncated SVD
  // by block Krylov (Halko, Martinsson & Tropp 2011; Musco & Musco 2015), Ω from a CPU generator seeded
  // with `seed`; fp64 in -> fp64, anything else -> fp32.  Not differentiable.
  m.def("rsvd(Tensor A, int rank, int oversample=8, int n_iter=2, int seed=0) -> (Tensor, Tensor, Tensor)");
  // A (m, n): A[:, perm] = Q (m, k) · R (k, n), |diag R| non-increasing, k = min(m, n) or `rank`
  // (truncated after `rank` pivots); column-pivoted Householder QR (Businger & Golub 1965), blocked as
  // LAPACK xGEQP3 (Quintana-Ortí, Sun & Bischof 1998).  perm int64.  Not differentiable.
  m.def("pivoted_qr(Tensor A, int? rank=None) -> (Tensor, Tensor, Tensor)");
}

namespace {
std::string build_info() {
#ifdef LOWRANK_OPS_WITH_CUDA
  return "lowrank_ops cpu+cuda";
#else
  return "lowrank_ops cpu";
#endif
}
}  // namespace

TORCH_LIBRARY(lowrank_ops, m) {
  // Which backends this build carries; the Python loader reports it.
  m.def("build_info() -> str", &build_info);
}
