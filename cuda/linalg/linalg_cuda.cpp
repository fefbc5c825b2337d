// CUDA registrations of the linalg family.  Both ops are device-generic ATen
// compositions (cuBLAS GEMMs, cuSOLVER Cholesky/QR/SVD/orgqr), compiled on the
// host; no custom kernel is needed.  UNVALIDATED: never run on a GPU (docs/kernels.md).
// Both read a few scalars back to the host per step (pivot index, CholeskyQR
// check), which synchronizes the stream.
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "linalg/linalg_common.h"
#include "ops.h"

namespace lowrank_ops {

std::tuple<at::Tensor, at::Tensor, at::Tensor> rsvd_cuda(const at::Tensor& A, int64_t rank, int64_t oversample,
                                                         int64_t n_iter, int64_t seed) {
  const c10::cuda::CUDAGuard guard(A.device());
  return linalg_detail::rsvd_impl(A, rank, oversample, n_iter, seed);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> pivoted_qr_cuda(const at::Tensor& A, std::optional<int64_t> rank) {
  const c10::cuda::CUDAGuard guard(A.device());
  return linalg_detail::pivoted_qr_impl(A, rank);
}

}  // namespace lowrank_ops

TORCH_LIBRARY_IMPL(lowrank_ops, CUDA, m) {
  m.impl("rsvd", &lowrank_ops::rsvd_cuda);
  m.impl("pivoted_qr", &lowrank_ops::pivoted_qr_cuda);
}
