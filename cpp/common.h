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
inline std::string shape_str(at::IntArrayRef sizes) {
  std::string s = "(";
  for (size_t i = 0; i < sizes.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(sizes[i]);
  }
  return s + ")";
}

inline std::string shape_str(const at::Tensor& t) {
  return shape_str(t.sizes());
}

inline at::ScalarType compute_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// Whether the CPU is an Intel one (CPUID vendor; false off x86).  MKL picks its
// kernels by vendor, so which GEMM orientation is faster differs between Intel
// and other x86 CPUs (below).  Defined in cpu_features.cpp, compiled by the host
// compiler (this header is also read by nvcc).
bool cpu_is_intel();

// Whether y (M, N) = a·b should run as the mirrored product yᵀ = bᵀ·aᵀ into an
// (N, M) scratch copied back transposed.  ATen hands BLAS a row-major y as the
// column-major yᵀ, so few rows M (tokens) become BLAS's short *second*
// dimension, which MKL runs slower than the mirrored call for some M — by how
// much depends on the CPU (measured with W 4096², fp32, 2 threads):
//  * AMD EPYC (AVX2): x·Wᵀ at 16 tokens 16.6–23 ms direct vs 10.9 ms mirrored
//    (+0.05 ms copy), 32: 31 vs 15.5, 128: 73 vs 53, 512: 208 vs 193 (no longer
//    worth the rule); g·W (the input gradient): 16 tokens 29 vs 26, 64: 45 vs 35
//    — but 2 to 8 tokens with a transposed bᵀ fall off a cliff (12 → 170 ms), so
//    those stay direct.  Rule: forward 2..256 tokens, input gradient 16..256.
//  * Intel Xeon (Sapphire Rapids, AVX-512): x·Wᵀ mirrored/direct = 0.70 at 8
//    tokens, 0.61 at 16, 0.68 at 32, 0.79 at 48, 0.98 at 64, 1.06 at 256, but
//    2.1 at 2–3 tokens; the mirrored g·W is slower at every count (1.12–3.1×).
//    With W 1024² 8 tokens lose too (1.28), 16–48 win everywhere measured
//    (0.58–0.88 on 1024², 1200×1300, 4096×14336, 14336×4096).  Rule: forward
//    16..48 tokens, input gradient never.
// One row is a matrix-vector product either way.  CPU fp32/fp64 only: cuBLAS
// and the reduced-precision CPU paths are unaffected.
inline bool mirror_few_rows_gemm(int64_t M, const at::Tensor& b) {
  const int64_t N = b.size(1);
  if (!b.device().is_cpu() || (b.scalar_type() != at::kFloat && b.scalar_type() != at::kDouble)) return false;
  if (N < 4 * M) return false;
  const bool forward = b.t().is_contiguous();  // b = Wᵀ (x·Wᵀ); the input gradient's b = W
  if (cpu_is_intel()) return forward && M >= 16 && M <= 48;
  return M <= 256 && (forward ? M >= 2 : M >= 16);
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
