// CPU kernel of svd_update (Brand 2006): truncated SVD of U·diag(S)·Vh + P·Qᵀ
// in O((m+n)(k+c)²) — BLAS for the projections and rotations, LAPACK for the
// QRs of the two complements and the (k+c)² core SVD.  Schedule in
// svd_update_common.h.
#include <torch/library.h>

#include "linalg/svd_update_common.h"
#include "ops.h"

namespace lowrank_ops {

std::tuple<at::Tensor, at::Tensor, at::Tensor> svd_update_cpu(const at::Tensor& U, const at::Tensor& S,
                                                              const at::Tensor& Vh, const at::Tensor& P,
                                                              const at::Tensor& Q, int64_t rank) {
  return svdupd::svd_update_impl(U, S, Vh, P, Q, rank);
}

}  // namespace lowrank_ops

TORCH_LIBRARY_IMPL(lowrank_ops, CPU, m) {
  m.impl("svd_update", &lowrank_ops::svd_update_cpu);
}
