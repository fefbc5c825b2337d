// CPU kernels of lowrank_linear: one output allocation, the base GEMM written
// straight into it by BLAS (bias folded in as the GEMM's C operand), the rank-r
// term accumulated in place by a second BLAS call (beta = 1), and the optional
// out_scale/bias epilogue fused into one parallel pass.  up·down is never formed.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "lowrank/lowrank_common.h"

namespace lowrank_ops {
namespace {

constexpr int64_t kGrain = 16;  // rows per task: (out) elements each, so tasks stay >= ~64 KB

void row_epilogue_cpu(at::Tensor& y, const OptTensor& out_scale, const OptTensor& bias) {
  if (!out_scale.has_value() && !bias.has_value()) return;
  TORCH_INTERNAL_ASSERT(y.is_contiguous());
  const int64_t rows = y.size(0), cols = y.size(1);
  const at::Tensor os = out_scale.has_value() ? out_scale->contiguous() : at::Tensor();
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "lowrank_linear_epilogue", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    scalar_t* yp = y.data_ptr<scalar_t>();
    const scalar_t* sp = os.defined() ? os.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* bp = b.defined() ? b.const_data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, rows, kGrain, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        scalar_t* row = yp + r * cols;
        if (sp && bp) {
          for (int64_t j = 0; j < cols; ++j)
            row[j] = static_cast<scalar_t>(static_cast<acc_t>(row[j]) * static_cast<acc_t>(sp[j]) +
                                           static_cast<acc_t>(bp[j]));
        } else if (sp) {
          for (int64_t j = 0; j < cols; ++j)
            row[j] = static_cast<scalar_t>(static_cast<acc_t>(row[j]) * static_cast<acc_t>(sp[j]));
        } else {
          for (int64_t j = 0; j < cols; ++j)
            row[j] = static_cast<scalar_t>(static_cast<acc_t>(row[j]) + static_cast<acc_t>(bp[j]));
        }
      }
    });
  });
}

// Σ_t a[t, j]·b[t, j] in the accumulation dtype, one parallel pass, no (T, out) temporary.
at::Tensor column_dot_cpu(const at::Tensor& a_in, const at::Tensor& b_in) {
  const at::Tensor a = a_in.contiguous(), b = b_in.contiguous();
  const int64_t rows = a.size(0), cols = a.size(1);
  at::Tensor out = at::empty({cols}, a.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.scalar_type(), "lowrank_column_dot", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* ap = a.const_data_ptr<scalar_t>();
    const scalar_t* bp = b.const_data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    // Parallel over column blocks so each task owns its outputs (no atomics);
    // within a block, rows stream in order for cache-friendly reads.
    constexpr int64_t kCols = 256;
    const int64_t nblk = (cols + kCols - 1) / kCols;
    at::parallel_for(0, nblk, 1, [&](int64_t b0, int64_t b1) {
      acc_t acc[kCols];
      for (int64_t blk = b0; blk < b1; ++blk) {
        const int64_t c0 = blk * kCols, c1 = std::min(cols, c0 + kCols);
        for (int64_t j = c0; j < c1; ++j) acc[j - c0] = acc_t(0);
        for (int64_t r = 0; r < rows; ++r) {
          const scalar_t* ar = ap + r * cols;
          const scalar_t* br = bp + r * cols;
          for (int64_t j = c0; j < c1; ++j) acc[j - c0] += static_cast<acc_t>(ar[j]) * static_cast<acc_t>(br[j]);
        }
        for (int64_t j = c0; j < c1; ++j) op[j] = static_cast<scalar_t>(acc[j - c0]);
      }
    });
  });
  return out;
}

}  // namespace

at::Tensor lowrank_linear_cpu(const at::Tensor& x, const OptTensor& weight, const OptTensor& bias,
                              const at::Tensor& down, const at::Tensor& up, const OptTensor& core, double scale,
                              const OptTensor& out_scale) {
  return detail::lowrank_linear_impl(x, weight, bias, down, up, core, scale, out_scale, &row_epilogue_cpu);
}

Grads7 lowrank_linear_backward_cpu(const at::Tensor& grad, const at::Tensor& x, const OptTensor& weight,
                                   const at::Tensor& down, const at::Tensor& up, const OptTensor& core, double scale,
                                   const OptTensor& out_scale, std::array<bool, 7> output_mask) {
  return detail::lowrank_linear_backward_impl(grad, x, weight, down, up, core, scale, out_scale, output_mask,
                                              &column_dot_cpu);
}

}  // namespace lowrank_ops

TORCH_LIBRARY_IMPL(lowrank_ops, CPU, m) {
  m.impl("lowrank_linear", &lowrank_ops::lowrank_linear_cpu);
  m.impl("lowrank_linear_backward", &lowrank_ops::lowrank_linear_backward_cpu);
}
