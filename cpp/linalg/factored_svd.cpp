// CPU kernel of factored_svd: exact thin SVD of B·diag(w)·A from the QRs of B
// and Aᵀ and the SVD of the R×R middle factor (LAPACK geqrf/gesdd through
// ATen); the m×n product is never formed.  Schedule in svd_update_common.h.
#include <torch/library.h>

#include "linalg/svd_update_common.h"
#include "ops.h"

namespace lowrank_ops {

std::tuple<at::Tensor, at::Tensor, at::Tensor> factored_svd_cpu(const at::Tensor& B, const at::Tensor& A,
                                                                const OptTensor& weights, std::optional<int64_t> rank) {
  return svdupd::factored_svd_impl(B, A, weights, rank);
}

}  // namespace lowrank_ops

TORCH_LIBRARY_IMPL(lowrank_ops, CPU, m) {
  m.impl("factored_svd", &lowrank_ops::factored_svd_cpu);
}
