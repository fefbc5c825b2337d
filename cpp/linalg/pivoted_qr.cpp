// CPU registration of pivoted_qr: blocked column-pivoted Householder QR
// (xGEQP3-style panels, GEMM trailing updates through ATen BLAS; see linalg_common.h).
#include <torch/library.h>

#include "linalg/linalg_common.h"
#include "ops.h"

namespace lowrank_ops {

std::tuple<at::Tensor, at::Tensor, at::Tensor> pivoted_qr_cpu(const at::Tensor& A, std::optional<int64_t> rank) {
  return linalg_detail::pivoted_qr_impl(A, rank);
}

}  // namespace lowrank_ops

TORCH_LIBRARY_IMPL(lowrank_ops, CPU, m) {
  m.impl("pivoted_qr", &lowrank_ops::pivoted_qr_cpu);
}
