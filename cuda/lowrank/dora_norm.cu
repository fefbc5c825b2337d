// CUDA kernels of dora_norm: the device-generic schedule of lowrank_common.h
// (cuBLAS for W·downᵀ and the (r, r) Gram, ATen's linalg_vector_norm for ‖W‖²).
// Unvalidated on a GPU until docs/kernels.md says otherwise.
#include <ATen/DeviceGuard.h>
#include <torch/library.h>

#include "lowrank/lowrank_common.h"

namespace lowrank_ops {

at::Tensor dora_norm_cuda(const at::Tensor& weight, const at::Tensor& down, const at::Tensor& up, double scale,
                          const OptTensor& weight_norm_sq) {
  // An optional guard: with a CPU argument among CUDA ones the checks below name it.
  const c10::OptionalDeviceGuard guard(at::device_of(weight));
  return detail::dora_norm_impl(weight, down, up, scale, weight_norm_sq);
}

Grads3 dora_norm_backward_cuda(const at::Tensor& grad, const at::Tensor& norm, const at::Tensor& weight,
                               const at::Tensor& down, const at::Tensor& up, double scale,
                               std::array<bool, 3> output_mask) {
  // An optional guard: with a CPU argument among CUDA ones the checks below name it.
  const c10::OptionalDeviceGuard guard(at::device_of(weight));
  return detail::dora_norm_backward_impl(grad, norm, weight, down, up, scale, output_mask);
}

}  // namespace lowrank_ops

TORCH_LIBRARY_IMPL(lowrank_ops, CUDA, m) {
  m.impl("dora_norm", &lowrank_ops::dora_norm_cuda);
  m.impl("dora_norm_backward", &lowrank_ops::dora_norm_backward_cuda);
}
