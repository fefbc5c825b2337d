// CUDA kernels of dora_linear: the device-generic schedule of lowrank_common.h
// (one cuBLAS GEMM over [x; down], rank-r accumulation with beta = 1) plus the
// elementwise epilogue / column-dot kernels of cuda_elementwise.cuh.
// Unvalidated on a GPU until docs/kernels.md says otherwise.
#include <ATen/DeviceGuard.h>
#include <torch/library.h>

#include "lowrank/cuda_elementwise.cuh"
#include "lowrank/lowrank_common.h"

namespace lowrank_ops {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dora_linear_cuda(const at::Tensor& x,
    const at::Tensor& weight, const OptTensor& bias, const at::Tensor& down, const at::Tensor& up,
    const at::Tensor& magnitude, double scale, const OptTensor& weight_norm_sq) {
  // An optional guard: with a CPU argument among CUDA ones the checks below name it.
  const c10::OptionalDeviceGuard guard(at::device_of(x));
  return detail::dora_linear_impl(x, weight, bias, down, up, magnitude, scale, weight_norm_sq,
                                  &cuda::row_epilogue_cuda);
}

Grads6 dora_linear_backward_cuda(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight,
                                 const at::Tensor& down, const at::Tensor& up, const at::Tensor& magnitude,
                                 double scale, const at::Tensor& pre_scale, const at::Tensor& norm,
                                 std::array<bool, 6> output_mask, const OptTensor& h) {
  // An optional guard: with a CPU argument among CUDA ones the checks below name it.
  const c10::OptionalDeviceGuard guard(at::device_of(x));
  return detail::dora_linear_backward_impl(grad, x, weight, down, up, magnitude, scale, pre_scale, norm, output_mask,
                                           &cuda::column_dot_cuda, h);
}

}  // namespace lowrank_ops

TORCH_LIBRARY_IMPL(lowrank_ops, CUDA, m) {
  m.impl("dora_linear", &lowrank_ops::dora_linear_cuda);
  m.impl("dora_linear_backward", &lowrank_ops::dora_linear_backward_cuda);
}
