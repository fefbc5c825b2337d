// CPU elementwise pieces shared by the lowrank family's kernels: the row
// epilogue (scale/bias per output column) and the column dot product used by
// the out_scale / magnitude gradients.  One parallel pass each, fp32
// accumulation for low precision, no temporaries.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <algorithm>

#include "ops.h"

namespace lowrank_ops {
namespace cpu {


constexpr int64_t kGrain = 16;  // rows per task: (out) elements each, so tasks stay >= ~64 KB

// dst = src ⊙ out_scale + bias row-wise (either optional); dst may be src.
inline void row_epilogue_cpu(at::Tensor& dst, const at::Tensor& src, const OptTensor& out_scale, const OptTensor& bias) {
  if (!out_scale.has_value() && !bias.has_value()) {
    if (!dst.is_same(src)) dst.copy_(src);
    return;
  }
  TORCH_INTERNAL_ASSERT(dst.is_contiguous() && src.is_contiguous() && dst.sizes() == src.sizes());
  const int64_t rows = dst.size(0), cols = dst.size(1);
  const at::Tensor os = out_scale.has_value() ? out_scale->contiguous() : at::Tensor();
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dst.scalar_type(), "lowrank_row_epilogue", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = src.const_data_ptr<scalar_t>();
    scalar_t* yp = dst.data_ptr<scalar_t>();
    const scalar_t* sp = os.defined() ? os.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* bp = b.defined() ? b.const_data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, rows, kGrain, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const scalar_t* in = xp + r * cols;
        scalar_t* row = yp + r * cols;
        if (sp && bp) {
          for (int64_t j = 0; j < cols; ++j)
            row[j] = static_cast<scalar_t>(static_cast<acc_t>(in[j]) * static_cast<acc_t>(sp[j]) +
                                           static_cast<acc_t>(bp[j]));
        } else if (sp) {
          for (int64_t j = 0; j < cols; ++j)
            row[j] = static_cast<scalar_t>(static_cast<acc_t>(in[j]) * static_cast<acc_t>(sp[j]));
        } else {
          for (int64_t j = 0; j < cols; ++j)
            row[j] = static_cast<scalar_t>(static_cast<acc_t>(in[j]) + static_cast<acc_t>(bp[j]));
        }
      }
    });
  });
}

// Σ_t a[t, j]·b[t, j] in the accumulation dtype, one parallel pass, no (T, out) temporary.
inline at::Tensor column_dot_cpu(const at::Tensor& a_in, const at::Tensor& b_in) {
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

}  // namespace cpu
}  // namespace lowrank_ops
