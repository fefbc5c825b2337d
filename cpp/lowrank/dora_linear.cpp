// CPU kernels of dora_linear: one BLAS GEMM over the stacked rows [x; down]
// (W is read once for both the output and the norm's W·downᵀ), the rank-r
// term accumulated in place, the factored norm on (out, r) tensors, and the
// m/n scale + bias applied in one parallel pass.  up·down is never formed.
#include <torch/library.h>

#include "lowrank/cpu_elementwise.h"
#include "lowrank/lowrank_common.h"

namespace lowrank_ops {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dora_linear_cpu(const at::Tensor& x,
    const at::Tensor& weight, const OptTensor& bias, const at::Tensor& down, const at::Tensor& up,
    const at::Tensor& magnitude, double scale, const OptTensor& weight_norm_sq) {
  return detail::dora_linear_impl(x, weight, bias, down, up, magnitude, scale, weight_norm_sq, &cpu::row_epilogue_cpu);
}

Grads6 dora_linear_backward_cpu(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight,
                                const at::Tensor& down, const at::Tensor& up, const at::Tensor& magnitude,
                                double scale, const at::Tensor& pre_scale, const at::Tensor& norm,
                                std::array<bool, 6> output_mask, const OptTensor& h) {
  return detail::dora_linear_backward_impl(grad, x, weight, down, up, magnitude, scale, pre_scale, norm, output_mask,
                                           &cpu::column_dot_cpu, h);
}

}  // namespace lowrank_ops

TORCH_LIBRARY_IMPL(lowrank_ops, CPU, m) {
  m.impl("dora_linear", &lowrank_ops::dora_linear_cpu);
  m.impl("dora_linear_backward", &lowrank_ops::dora_linear_backward_cpu);
}
