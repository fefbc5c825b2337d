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
  // lowrank_linear that also returns its rank-r intermediate h = x·downᵀ (..., r_d),
  // a non-differentiable output its backward reuses (DESIGN §2: the backward saves
  // x and the rank-r intermediate).  The typed wrapper uses it whenever a gradient flows.
  m.def("lowrank_linear_with_h(Tensor x, Tensor? weight, Tensor? bias, Tensor down, Tensor up, "
        "Tensor? core=None, float scale=1.0, Tensor? out_scale=None) -> (Tensor, Tensor)");
  // Gradients of lowrank_linear for the inputs selected by output_mask
  // (x, weight, bias, down, up, core, out_scale); unselected ones are empty tensors.
  // h: the forward's x·downᵀ (from lowrank_linear_with_h); recomputed when None.
  m.def("lowrank_linear_backward(Tensor grad, Tensor x, Tensor? weight, Tensor down, Tensor up, "
        "Tensor? core, float scale, Tensor? out_scale, bool[7] output_mask, Tensor? h=None) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // n_j = ‖W_j + scale·up_j·down‖₂ by the factored identity
  // ‖W‖² + 2s·rowsum((W·downᵀ)⊙up) + s²·rowsum((up·(down·downᵀ))⊙up); never forms up·down.
  // weight_norm_sq: optional cached rowsum(W⊙W) (out) for a frozen W.
  m.def("dora_norm(Tensor weight, Tensor down, Tensor up, float scale, Tensor? weight_norm_sq=None) -> Tensor");
  // DoRA (Liu et al. 2024, Eq. 5) in one call with one pass over W:
  // y = (magnitude / n) ⊙ (x·Wᵀ + scale·x·downᵀ·upᵀ) + bias, n = ‖W + scale·up·down‖ per row.
  // Returns (y, pre_scale, n, h), h = x·downᵀ; the norm is a constant in y's backward
  // (paper §4.3, as peft); pre_scale, n and h are what the backward reuses.
  m.def("dora_linear(Tensor x, Tensor weight, Tensor? bias, Tensor down, Tensor up, Tensor magnitude, "
        "float scale=1.0, Tensor? weight_norm_sq=None) -> (Tensor, Tensor, Tensor, Tensor)");
  // Gradients of dora_linear's y for (x, weight, bias, down, up, magnitude) selected by output_mask.
  m.def("dora_linear_backward(Tensor grad, Tensor x, Tensor weight, Tensor down, Tensor up, Tensor magnitude, "
        "float scale, Tensor pre_scale, Tensor norm, bool[6] output_mask, Tensor? h=None) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Gradients of dora_norm for (weight, down, up) selected by output_mask.
  m.def("dora_norm_backward(Tensor grad, Tensor norm, Tensor weight, Tensor down, Tensor up, float scale, "
        "bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_FRAGMENT(lowrank_ops, m) {
  m.set_python_module("lowrank_ops.ops.linalg_update");
  // Exact thin SVD of B·diag(weights)·A, B (..., m, R), A (..., R, n), weights (R,) | (..., R):
  // QR of B and Aᵀ, SVD of the R×R middle factor; never forms the m×n product.
  // rank defaults to min(m, n, R).  Returns U (..., m, rank), S (..., rank), Vh (..., rank, n).
  m.def("factored_svd(Tensor B, Tensor A, Tensor? weights=None, int? rank=None) -> (Tensor, Tensor, Tensor)");
  // Truncated SVD of U·diag(S)·Vh + P·Qᵀ (Brand 2006), U (..., m, k), S (..., k), Vh (..., k, n),
  // P (..., m, c), Q (..., n, c); O((m+n)(k+c)²).
  m.def("svd_update(Tensor U, Tensor S, Tensor Vh, Tensor P, Tensor Q, int rank) -> (Tensor, Tensor, Tensor)");
  // Truncated SVD of [U·diag(S)·Vh, C] (dim=1, C (..., m, c)) or [U·diag(S)·Vh; C] (dim=0, C (..., c, n))
  // (Zha & Simon 1999).
  m.def("svd_append(Tensor U, Tensor S, Tensor Vh, Tensor C, int rank, int dim=1) -> (Tensor, Tensor, Tensor)");
  // svd_append with a sparse update given as the CSR (crow, col, val) of the (c, L) matrix whose rows are
  // the appended vectors (dim=1: columns of C, L = m; dim=0: rows of C, L = n); unbatched.  The complement
  // C − U·UᵀC is kept implicit (Deng et al. 2024, "Fast Updating Truncated SVD ... Sparse Matrices").
  m.def("svd_append_sparse(Tensor U, Tensor S, Tensor Vh, Tensor crow, Tensor col, Tensor val, int rank, "
        "int dim=1) -> (Tensor, Tensor, Tensor)");
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

TORCH_LIBRARY_FRAGMENT(lowrank_ops, m) {
  m.set_python_module("lowrank_ops.ops.merge");
  // k-th largest |x| (0-d, x's dtype), k = max(1, floor(density·numel)) for 0 < density < 1
  // (mergekit's rule), numel at density 1, none (+inf) at 0; by selection, O(numel).
  m.def("magnitude_threshold(Tensor x, float density) -> Tensor");
  // TIES-Merging (Yadav et al. 2023, Alg. 1) of deltas (N, P) with weights (N):
  // trim each row to its top-density |δ|, elect the sign of Σ w·δ (sum) or of the
  // sign count (count), disjoint mean over agreeing models (÷ Σ w if normalize) -> (P).
  m.def("ties_merge(Tensor deltas, Tensor weights, float density, str sign_method=\"sum\", "
        "bool normalize=True) -> Tensor");
  // DARE (Yu et al. 2024, Eq. 2-3): drop δ with prob 1-density by a counter hash of
  // (seed, model, element), rescale by 1/density, then Σ w·δ (consensus "none") or
  // the TIES election + disjoint sum (consensus "ties"), ÷ Σ w if normalize -> (P).
  m.def("dare_merge(Tensor deltas, Tensor weights, float density, int seed, str consensus=\"none\", "
        "str sign_method=\"sum\", bool normalize=False) -> Tensor");
  // n:m magnitude mask along the last dim (bool, x's shape), never choosing a
  // `forbidden` position (CABS, Yang et al. 2025).
  m.def("nm_mask(Tensor x, int n, int m, Tensor? forbidden=None) -> Tensor");
  // Per coordinate of deltas (N, P): elected sign (±1, deltas' dtype) of the models with
  // |δ| > eps, the number of those agreeing with it (int32) and their number (int32).
  // NegMerge (Kim et al. 2025) keeps support == N; RAM splits count == 1 from count > 1.
  m.def("sign_consensus(Tensor deltas, Tensor? weights=None, float eps=0.0, str sign_method=\"sum\") "
        "-> (Tensor, Tensor, Tensor)");
}

// The merge ops are not differentiable (masks, counts, order statistics, sign-gated
// sums): their autograd (lowrank_ops/ops/merge.py) raises on a backward through them.
