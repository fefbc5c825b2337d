// CPU kernels of dora_norm.  The op is GEMM-bound (W·downᵀ, one pass over W)
// plus (out, r)-sized combinations, so the device-generic ATen schedule in
// lowrank_common.h is the kernel: BLAS for the products, one streaming
// reduction for ‖W‖², never an (out, in) temporary in forward.
#include <torch/library.h>

#include "lowrank/lowrank_common.h"

namespace lowrank_ops {

at::Tensor dora_norm_cpu(const at::Tensor& weight, const at::Tensor& down, const at::Tensor& up, double scale,
                         const OptTensor& weight_norm_sq) {
  return detail::dora_norm_impl(weight, down, up, scale, weight_norm_sq);
}

Grads3 dora_norm_backward_cpu(const at::Tensor& grad, const at::Tensor& norm, const at::Tensor& weight,
                              const at::Tensor& down, const at::Tensor& up, double scale,
                              std::array<bool, 3> output_mask) {
  return detail::dora_norm_backward_impl(grad, norm, weight, down, up, scale, output_mask);
}

}  // namespace lowrank_ops

TORCH_LIBRARY_IMPL(lowrank_ops, CPU, m) {
  m.impl("dora_norm", &lowrank_ops::dora_norm_cpu);
  m.impl("dora_norm_backward", &lowrank_ops::dora_norm_backward_cpu);
}
