// CUDA registrations of factored_svd, svd_update, svd_append and
// svd_append_sparse: the device-generic ATen schedule of
// cpp/linalg/svd_update_common.h (cuSOLVER QR/SVD, cuBLAS GEMMs), host-compiled.
// The sparse update is densified to its (c, L) rows and runs the dense
// update (no sparse kernel on CUDA yet).  UNVALIDATED: compiled, never run.
#include <torch/library.h>

#include <ATen/DeviceGuard.h>

#include "linalg/svd_update_common.h"
#include "ops.h"

namespace lowrank_ops {

using SVD3 = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

SVD3 factored_svd_cuda(const at::Tensor& B, const at::Tensor& A, const OptTensor& weights,
                       std::optional<int64_t> rank) {
  // An optional guard: with a CPU argument among CUDA ones the checks below name it.
  const c10::OptionalDeviceGuard guard(at::device_of(B));
  return svdupd::factored_svd_impl(B, A, weights, rank);
}

SVD3 svd_update_cuda(const at::Tensor& U, const at::Tensor& S, const at::Tensor& Vh, const at::Tensor& P,
                     const at::Tensor& Q, int64_t rank) {
  // An optional guard: with a CPU argument among CUDA ones the checks below name it.
  const c10::OptionalDeviceGuard guard(at::device_of(U));
  return svdupd::svd_update_impl(U, S, Vh, P, Q, rank);
}

SVD3 svd_append_cuda(const at::Tensor& U, const at::Tensor& S, const at::Tensor& Vh, const at::Tensor& C,
                     int64_t rank, int64_t dim) {
  // An optional guard: with a CPU argument among CUDA ones the checks below name it.
  const c10::OptionalDeviceGuard guard(at::device_of(U));
  return svdupd::svd_append_impl(U, S, Vh, C, rank, dim);
}

SVD3 svd_append_sparse_cuda(const at::Tensor& U, const at::Tensor& S, const at::Tensor& Vh, const at::Tensor& crow,
                            const at::Tensor& col, const at::Tensor& val, int64_t rank, int64_t dim) {
  // An optional guard: with a CPU argument among CUDA ones the checks below name it.
  const c10::OptionalDeviceGuard guard(at::device_of(U));
  return svdupd::svd_append_sparse_densified(U, S, Vh, crow, col, val, rank, dim);
}

}  // namespace lowrank_ops

TORCH_LIBRARY_IMPL(lowrank_ops, CUDA, m) {
  m.impl("factored_svd", &lowrank_ops::factored_svd_cuda);
  m.impl("svd_update", &lowrank_ops::svd_update_cuda);
  m.impl("svd_append", &lowrank_ops::svd_append_cuda);
  m.impl("svd_append_sparse", &lowrank_ops::svd_append_sparse_cuda);
}
