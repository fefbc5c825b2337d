// CPU registration of rsvd: block Krylov randomized SVD composed from ATen
// BLAS/LAPACK calls (linalg_common.h has the algorithm and its paper).
#include <torch/library.h>

#include "linalg/linalg_common.h"
#include "ops.h"

namespace lowrank_ops {

std::tuple<at::Tensor, at::Tensor, at::Tensor> rsvd_cpu(const at::Tensor& A, int64_t rank, int64_t oversample,
                                                        int64_t n_iter, int64_t seed) {
  return linalg_detail::rsvd_impl(A, rank, oversample, n_iter, seed);
}

}  // namespace lowrank_ops

TORCH_LIBRARY_IMPL(lowrank_ops, CPU, m) {
  m.impl("rsvd", &lowrank_ops::rsvd_cpu);
}
