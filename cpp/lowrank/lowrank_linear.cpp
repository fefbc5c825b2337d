// CPU kernels of lowrank_linear: one output allocation, the base GEMM written
// straight into it by BLAS (bias folded in as the GEMM's C operand; for few
// tokens mirrored through a small (out, T) scratch, see common.h), the rank-r
// term accumulated in place by a second BLAS call (beta = 1), and the optional
// out_scale/bias epilogue fused into one parallel pass.  up·down is never formed.
#include <torch/library.h>

#include "lowrank/cpu_elementwise.h"
#include "lowrank/lowrank_common.h"

namespace lowrank_ops {
namespace {

void row_epilogue_inplace(at::Tensor& y, const OptTensor& out_scale, const OptTensor& bias) {
  cpu::row_epilogue_cpu(y, y, out_scale, bias);
}

}  // namespace

at::Tensor lowrank_linear_cpu(const at::Tensor& x, const OptTensor& weight, const OptTensor& bias,
                              const at::Tensor& down, const at::Tensor& up, const OptTensor& core, double scale,
                              const OptTensor& out_scale) {
  return detail::lowrank_linear_impl(x, weight, bias, down, up, core, scale, out_scale, &row_epilogue_inplace);
}

std::tuple<at::Tensor, at::Tensor> lowrank_linear_with_h_cpu(const at::Tensor& x, const OptTensor& weight,
    const OptTensor& bias, const at::Tensor& down, const at::Tensor& up, const OptTensor& core, double scale,
    const OptTensor& out_scale) {
  at::Tensor h;
  at::Tensor y =
      detail::lowrank_linear_impl(x, weight, bias, down, up, core, scale, out_scale, &row_epilogue_inplace, &h);
  return {y, h};
}

Grads7 lowrank_linear_backward_cpu(const at::Tensor& grad, const at::Tensor& x, const OptTensor& weight,
                                   const at::Tensor& down, const at::Tensor& up, const OptTensor& core, double scale,
                                   const OptTensor& out_scale, std::array<bool, 7> output_mask,
                                   const OptTensor& h) {
  return detail::lowrank_linear_backward_impl(grad, x, weight, down, up, core, scale, out_scale, output_mask,
                                              &cpu::column_dot_cpu, h);
}

}  // namespace lowrank_ops

TORCH_LIBRARY_IMPL(lowrank_ops, CPU, m) {
  m.impl("lowrank_linear", &lowrank_ops::lowrank_linear_cpu);
  m.impl("lowrank_linear_with_h", &lowrank_ops::lowrank_linear_with_h_cpu);
  m.impl("lowrank_linear_backward", &lowrank_ops::lowrank_linear_backward_cpu);
}
