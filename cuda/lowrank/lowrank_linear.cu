// CUDA kernels of lowrank_linear.  Products go through cuBLAS via ATen (base
// GEMM straight into the output, rank-r term accumulated with beta = 1); the
// out_scale/bias epilogue and the out_scale gradient are simple elementwise /
// column-reduction kernels of cuda_elementwise.cuh.  Fusing the rank-r term into a CUTLASS
// epilogue is left for a session with a GPU to validate and time it
// (docs/kernels.md marks these kernels unvalidated until then).
#include <ATen/DeviceGuard.h>
#include <torch/library.h>

#include "lowrank/cuda_elementwise.cuh"
#include "lowrank/lowrank_common.h"

namespace lowrank_ops {
namespace {

void row_epilogue_inplace(at::Tensor& y, const OptTensor& out_scale, const OptTensor& bias) {
  cuda::row_epilogue_cuda(y, y, out_scale, bias);
}

}  // namespace

at::Tensor lowrank_linear_cuda(const at::Tensor& x, const OptTensor& weight, const OptTensor& bias,
                               const at::Tensor& down, const at::Tensor& up, const OptTensor& core, double scale,
                               const OptTensor& out_scale) {
  // An optional guard: with a CPU argument among CUDA ones the checks below name it.
  const c10::OptionalDeviceGuard guard(at::device_of(x));
  return detail::lowrank_linear_impl(x, weight, bias, down, up, core, scale, out_scale, &row_epilogue_inplace);
}

std::tuple<at::Tensor, at::Tensor> lowrank_linear_with_h_cuda(const at::Tensor& x, const OptTensor& weight,
    const OptTensor& bias, const at::Tensor& down, const at::Tensor& up, const OptTensor& core, double scale,
    const OptTensor& out_scale) {
  // An optional guard: with a CPU argument among CUDA ones the checks below name it.
  const c10::OptionalDeviceGuard guard(at::device_of(x));
  at::Tensor h;
  at::Tensor y =
      detail::lowrank_linear_impl(x, weight, bias, down, up, core, scale, out_scale, &row_epilogue_inplace, &h);
  return {y, h};
}

Grads7 lowrank_linear_backward_cuda(const at::Tensor& grad, const at::Tensor& x, const OptTensor& weight,
                                    const at::Tensor& down, const at::Tensor& up, const OptTensor& core,
                                    double scale, const OptTensor& out_scale, std::array<bool, 7> output_mask,
                                    const OptTensor& h) {
  // An optional guard: with a CPU argument among CUDA ones the checks below name it.
  const c10::OptionalDeviceGuard guard(at::device_of(x));
  return detail::lowrank_linear_backward_impl(grad, x, weight, down, up, core, scale, out_scale, output_mask,
                                              &cuda::column_dot_cuda, h);
}

}  // namespace lowrank_ops

TORCH_LIBRARY_IMPL(lowrank_ops, CUDA, m) {
  m.impl("lowrank_linear", &lowrank_ops::lowrank_linear_cuda);
  m.impl("lowrank_linear_with_h", &lowrank_ops::lowrank_linear_with_h_cuda);
  m.impl("lowrank_linear_backward", &lowrank_ops::lowrank_linear_backward_cuda);
}
