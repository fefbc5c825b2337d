// Helpers every op family shares: argument-error formatting and the compute
// dtype rule (DESIGN §3: fp64 stays fp64, everything else computes in fp32).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/add.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/mm.h>
#include <c10/util/Optional.h>

#include <string>

namespace lowrank_ops {

// "(d0, d1, ...)" for error messages that name an argument's actual shape.
inline std::string shape_str(const at::Tensor& t) {
  std::string s = "(";
  for (int64_t i = 0; i < t.dim(); ++i) {
    if (i) s += ", ";
    s += std::to_string(t.size(i));
  }
  return s + ")";
}

inline at::ScalarType compute_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// Whether y (M, N) = a·b should run as the mirrored product yᵀ = bᵀ·aᵀ into an
// (N, M) scratch copied back transposed.  ATen hands BLAS a row-major y as the
// column-major yᵀ, so few rows M (tokens) become BLAS's short *second*
// dimension; MKL on the development machine (AMD EPYC, 2 threads, fp32) runs
// that shape at half the speed of the mirrored call.  Measured, x·Wᵀ with W
// 4096²: 16 tokens 16.6–23 ms direct vs 10.9 ms mirrored (+0.05 ms copy), 32:
// 31 vs 15.5, 128: 73 vs 53, 512: 208 vs 193 (no longer worth the rule);
// g·W (the input gradient): 16 tokens 29 vs 26, 64: 45 vs 35 — but 2 to 8
// tokens with a transposed bᵀ fall off a cliff in MKL (12 → 170 ms), so
// those stay direct.  One row is a matrix-vector product either way.  CPU
// fp32/fp64 only: cuBLAS and the reduced-precision CPU paths are unaffected.
inline bool mirror_few_rows_gemm(int64_t M, const at::Tensor& b) {
  const int64_t N = b.size(1);
  if (!b.device().is_cpu() || (b.scalar_type() != at::kFloat && b.scalar_type() != at::kDouble)) return false;
  if (M > 256 || N < 4 * M) return false;
  return b.t().is_contiguous() ? M >= 2 : M >= 16;
}

// y = a·b (+ bias, broadcast over rows) written into y, (M, N); mirrored when
// mirror_few_rows_gemm says so.  The scratch is (N, M): for few rows a
// fraction of what the GEMM reads.
inline void few_rows_mm_out(at::Tensor& y, const at::Tensor& a, const at::Tensor& b,
                            const std::optional<at::Tensor>& bias = std::nullopt) {
  if (mirror_few_rows_gemm(a.size(0), b)) {
    const at::Tensor yt = at::mm(b.t(), a.t());
    if (bias.has_value()) {
      at::add_out(y, yt.t(), *bias);
    } else {
      y.copy_(yt.t());
    }
  } else if (bias.has_value()) {
    at::addmm_out(y, *bias, a, b);
  } else {
    at::mm_out(y, a, b);
  }
}

}  // namespace lowrank_ops
