// Device-generic pieces of the linalg family (rsvd, pivoted_qr) shared by the
// CPU registrations (cpp/linalg/*.cpp) and the CUDA ones (cuda/linalg/linalg_cuda.cpp).
// Every dense product, Cholesky, QR and small SVD goes through ATen (BLAS/LAPACK
// on CPU, cuBLAS/cuSOLVER on CUDA); nothing here is a hand-written GEMM.
#pragma once

#include "common.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace lowrank_ops {
namespace linalg_detail {

using lowrank_ops::shape_str;
using lowrank_ops::compute_dtype;

inline void check_float_input(const at::Tensor& A, const char* op) {
  TORCH_CHECK(at::isFloatingType(A.scalar_type()), op,
              ": `A` must be a floating tensor (float64/float32/bfloat16/float16), got ", A.scalar_type());
}

// Non-finite input policy of the linalg family: NaN or Inf raises this error
// (naming the op) instead of LAPACK's convergence failure or silent NaN factors.
// Checked where it is cheap: on the input where the op reads it in full anyway
// (pivoted_qr, rsvd's exact route), else on a small product every input entry
// reaches (rsvd's first sketch A·Ω or Gram matrix, the update ops' core matrix):
// a NaN or Inf in any entry of a factor makes that product non-finite.
// One streaming sum decides almost always (a NaN or Inf entry makes it non-finite;
// isfinite(t).all() makes several passes with temporaries: 0.4 ms of svd_append's 2.5
// at 64 × 4096); only a non-finite sum, which finite data can give by overflow, is
// checked entry by entry.
// `derived`: t is a product of the input, not the input itself, so a non-finite t may
// also come from finite values too large for the compute dtype; the message says so.
inline void check_finite(const at::Tensor& t, const char* op, const char* what, bool derived = false) {
  if (t.numel() == 0 || std::isfinite(t.sum().item<double>())) return;
  TORCH_CHECK(at::isfinite(t).all().item<bool>(), op, ": ", what, " contains NaN or Inf",
              derived ? " (or values whose products overflow the compute dtype)" : "",
              "; the linalg ops require finite input");
}

// ---------------------------------------------------------------- orthonormalisation

// Whether a Cholesky factorisation failed (info ≠ 0 for some matrix of the batch).
inline bool cholesky_failed(const at::Tensor& info) {
  return info.dim() == 0 ? info.item<int64_t>() != 0 : info.any().item<bool>();
}

// One CholeskyQR round X·L⁻ᵀ with G = XᵀX = L·Lᵀ given; false if the Cholesky fails.
// X·L⁻ᵀ is a GEMM with the small inverse: a triangular solve against the tall
// transposed block is several times slower in LAPACK/MKL.
// With `dst` given (a view, e.g. a column slice of a basis) X·L⁻ᵀ is written there
// and `out` is `dst`.  With `min_pivot` > 0 the round also fails when some
// pivot L_ii² falls below min_pivot · max_j L_jj² (numerically rank-deficient X,
// whose tiny pivots a Cholesky of rounded data need not reject).
inline bool cholqr_round(const at::Tensor& X, const at::Tensor& G, const at::Tensor& eye, at::Tensor& out,
                         at::Tensor dst = at::Tensor(), double min_pivot = 0.0) {
  auto [L, info] = at::linalg_cholesky_ex(G);
  if (cholesky_failed(info)) return false;  // not positive definite
  if (min_pivot > 0) {
    const at::Tensor d2 = L.diagonal(0, -2, -1).square();
    if (!(d2.amin(-1) >= d2.amax(-1) * min_pivot).all().item<bool>()) return false;
  }
  const at::Tensor Linv_t = at::linalg_solve_triangular(L, eye, /*upper=*/false).mT();
  if (dst.defined()) {
    at::matmul_out(dst, X, Linv_t);
    out = dst;
  } else {
    out = at::matmul(X, Linv_t);
  }
  return true;
}

// ‖G − I‖_F ≤ 1/2 (so ‖G − I‖₂ ≤ 1/2 and κ(G) ≤ 3), for every matrix of a batch:
// the block is orthonormal enough for one more CholeskyQR round to make it
// orthonormal to O(u) (the CholeskyQR2 analysis of Yamamoto, Nakatsukasa,
// Yanagisawa & Fukaya 2015).  NaN or Inf fails the test.
inline bool near_identity(const at::Tensor& G, const at::Tensor& eye) {
  if (G.dim() == 2) return at::dist(G, eye).item<double>() <= 0.5;  // one op for the common case
  return at::linalg_matrix_norm(G - eye, "fro").amax().item<double>() <= 0.5;
}

// X ← X − Qp·(Qpᵀ·X) in place (for a single matrix one GEMM with beta = 1);
// X unchanged when Qp is undefined or has no columns.
inline at::Tensor project_out(at::Tensor X, const at::Tensor& Qp) {
  if (!Qp.defined() || Qp.size(-1) == 0) return X;
  const at::Tensor C = at::matmul(Qp.mT(), X);
  if (X.dim() == 2) {
    X.addmm_(Qp, C, /*beta=*/1, /*alpha=*/-1);
  } else {
    X.sub_(at::matmul(Qp, C));
  }
  return X;
}

// The CholeskyQR part of BCGS2 on a block Y already projected against Qp: Q₁ =
// Y·L₁⁻ᵀ (into `work` when given), Y₂ = Q₁ projected once more, Q = Y₂·L₂⁻ᵀ (into
// `dst` when given).  One round leaves an orthogonality error of about
// u·cond(Y)², fixed by the second round when ‖G₂ − I‖_F ≤ 1/2, which its Gram
// matrix G₂ tells at no extra cost.  False where a Cholesky fails, a first-round
// pivot falls below `min_pivot` (cholqr_round) or G₂ is too far from I; `redo`
// is then the block a Householder QR should take instead (Y, or Y₂ once the first
// round succeeded).
inline bool cholqr2_projected(const at::Tensor& Y, const at::Tensor& Qp, const at::Tensor& eye, at::Tensor& Q,
                              at::Tensor& redo, const at::Tensor& dst = at::Tensor(),
                              const at::Tensor& work = at::Tensor(), double min_pivot = 0.0) {
  at::Tensor Q1;
  if (!cholqr_round(Y, at::matmul(Y.mT(), Y), eye, Q1, work, min_pivot)) {
    redo = Y;
    return false;
  }
  at::Tensor Y2 = project_out(Q1, Qp);
  const at::Tensor G2 = at::matmul(Y2.mT(), Y2);
  if (!near_identity(G2, eye) || !cholqr_round(Y2, G2, eye, Q, dst)) {
    redo = Y2;
    return false;
  }
  return true;
}

// Orthonormal block Q with range(Q) = range(Y) ⊥ range(Qp) (Qp undefined or
// empty: plain orthonormalisation), for a batch of tall blocks Y (..., m, b).
//
// Block classical Gram–Schmidt twice, each pass followed by a CholeskyQR round
// (BCGS2 with CholeskyQR, cholqr2_projected; without Qp it is CholeskyQR2 of
// Yamamoto et al. 2015): per round one b×b Gram GEMM, a b×b Cholesky and one
// GEMM with its inverse — instead of Householder QR's BLAS-2 panels.  Anything
// else — a failed Cholesky (rank-deficient Y: exactly-low-rank A, a deflated
// Krylov block) or too much lost orthogonality — falls back to Householder QR
// of the current block, always orthonormal.  Each check reads one scalar (a sync
// on CUDA).  With Qp given, Y is consumed: projected in place.
// With `dst` given (same shape as Y, e.g. the block's slice of a basis) the result
// is written there (straight from the last GEMM on the CholeskyQR path) and returned.
// `eye_b` (b × b identity) and `work` (scratch shaped like Y, for the first
// round's output) may be passed in by callers that orthonormalise many blocks.
inline at::Tensor orthonormalize_against(at::Tensor Y, const at::Tensor& Qp, const at::Tensor& dst = at::Tensor(),
                                         const at::Tensor& eye_b = at::Tensor(), const at::Tensor& work = at::Tensor()) {
  const int64_t b = Y.size(-1);
  if (b == 0 || Y.size(-2) == 0) return dst.defined() ? dst : Y.clone();  // nothing to write
  const at::Tensor eye = eye_b.defined() ? eye_b : at::eye(b, Y.options());
  Y = project_out(Y, Qp);
  at::Tensor Q, redo;
  if (cholqr2_projected(Y, Qp, eye, Q, redo, dst, work)) return Q;
  const int64_t p = Qp.defined() ? Qp.size(-1) : 0;
  if (p == 0 || p + b > Y.size(-2)) {
    // Householder's Q is orthonormal; projected once more it is ⊥ Qp to O(u) too
    // (with p + b > m no b columns ⊥ Qp exist; the caller keeps p + b ≤ m).
    Q = project_out(std::get<0>(at::linalg_qr(redo, "reduced")), Qp);
  } else {
    // A rank-deficient block (zero or exactly-low-rank A): Householder QR of
    // `redo` alone completes it with columns that may lie inside span(Qp), which
    // the projection would then zero.  QR of [Qp, redo] with Qp first completes
    // span(Qp) orthonormally instead; its last b columns are ⊥ Qp and span
    // range(redo) ⊥ Qp plus orthonormal filler for the deficient directions.
    Q = std::get<0>(at::linalg_qr(at::cat({Qp, redo}, -1), "reduced")).narrow(-1, p, b);
  }
  return dst.defined() ? dst.copy_(Q) : Q;
}

inline at::Tensor orthonormalize(const at::Tensor& Y) { return orthonormalize_against(Y, at::Tensor()); }

// ---------------------------------------------------------------- rsvd

inline void check_rsvd(const at::Tensor& A, int64_t rank, int64_t oversample, int64_t n_iter) {
  const char* op = "lowrank_ops::rsvd";
  check_float_input(A, op);
  TORCH_CHECK(A.dim() >= 2, op, ": `A` must have shape (..., m, n), got ", shape_str(A));
  const int64_t k = std::min(A.size(-2), A.size(-1));
  TORCH_CHECK(rank >= 1 && rank <= k, op, ": `rank` must satisfy 1 <= rank <= min(m, n) = ", k, " for `A` of shape ",
              shape_str(A), ", got rank=", rank);
  TORCH_CHECK(oversample >= 0, op, ": `oversample` must be >= 0, got ", oversample);
  TORCH_CHECK(n_iter >= 0, op, ": `n_iter` must be >= 0, got ", n_iter);
}

// Block sizes of the Krylov space (see ops/linalg.py's rsvd docstring for the why).
struct KrylovPlan {
  int64_t block;  // b: columns per block
  int64_t depth;  // d: number of blocks; the space has d·b columns, 2·d passes over A
};

// d = n_iter + 1 blocks — svd_lowrank's 2·n_iter + 2 passes, but every block is
// kept (a Krylov space of degree 2·n_iter + 1 in d·b dimensions) — of rank +
// oversample columns rounded down to a multiple of 16 (never below rank), where
// AVX-512 GEMMs cost less per column: measured (MKL, fp32, A 4096², Intel
// Sapphire Rapids) a pass of 16 columns takes 3.5 ms, of 20 or 24 4.4 ms, of 32
// 5.6 ms; at rank 16, 3 blocks of 16 run 1.78× svd_lowrank (q = 24) at 1.0007×
// the optimal error (svd_lowrank 1.0006×), 2 blocks of 32 1.70× at 1.0014×, 3 of
// 20 1.43× at 1.0001×.  Not rounded where fewer than 16 columns would be left or
// with one block (n_iter = 0), where the oversampling is the only slack.
inline KrylovPlan rsvd_plan(int64_t rank, int64_t oversample, int64_t n_iter) {
  const int64_t depth = n_iter + 1, wide = rank + oversample;
  if (depth == 1 || wide < 16) return {wide, depth};
  return {std::max(rank, wide / 16 * 16), depth};
}

// One CholeskyQR round (Householder QR where the Cholesky fails): a basis of
// range(X) that is well-conditioned, which is all a Krylov start block needs.
inline at::Tensor well_conditioned_basis(const at::Tensor& X, const at::Tensor& eye, const at::Tensor& dst) {
  at::Tensor out;
  if (!cholqr_round(X, at::matmul(X.mT(), X), eye, out, dst)) {
    out = std::get<0>(at::linalg_qr(X, "reduced"));
  }
  return out;
}

// Eigenpairs (ascending) of the Gram matrix G = X·Xᵀ of a wide X (..., L, n), of
// which the caller uses the top `rank`.  In fp32, λ_rank below ~1e3·u·λ₁
// (σ_rank < ~0.011·σ₁) would leave the last of those directions unresolved by
// G's rounding (measured: 1.09× the optimal error on an i⁻² spectrum at k = 64 in
// rayleigh_ritz_gram; 1.27× on i⁻³ at 200 × 1000, k = 40, on rsvd's Gram route),
// so G is then formed once more in fp64, which holds X's fp32 data exactly to
// u₆₄·‖X‖².  Decided once for a whole batch.
inline std::tuple<at::Tensor, at::Tensor> gram_eigh(const at::Tensor& X, int64_t rank) {
  const int64_t L = X.size(-2);
  const at::Tensor G = at::matmul(X, X.mT());
  check_finite(G, "lowrank_ops::rsvd", "`A`", /*derived=*/true);
  auto [evals, evecs] = at::linalg_eigh(G);
  if (X.scalar_type() == at::kFloat && rank > 0 && evals.numel() > 0) {
    const double u = std::numeric_limits<float>::epsilon();
    const bool resolved = (evals.narrow(-1, L - rank, 1) >= evals.narrow(-1, L - 1, 1) * (1e3 * u)).all().item<bool>();
    if (!resolved) {
      const at::Tensor X64 = X.to(at::kDouble);
      auto [e64, v64] = at::linalg_eigh(at::matmul(X64, X64.mT()));
      return std::make_tuple(e64.to(at::kFloat), v64.to(at::kFloat));
    }
  }
  return std::make_tuple(evals, evecs);
}

// The Gram route for a short dimension: for m ≤ n (else on Aᵀ) the eigenvectors
// of G = A·Aᵀ (m × m, one wide GEMM) for its c = min(rank + oversample, m) largest
// eigenvalues give Ũ, then one Rayleigh–Ritz step on the row space:
// Z = orth(Aᵀ·Ũ), A ≈ (A·Z)·Zᵀ and the SVD of the small m × c matrix A·Z.
// The Gram matrix in the compute dtype resolves eigen-directions only down to
// σᵢ² ≈ u·σ₁² (u the unit roundoff); the step through Aᵀ is one subspace
// iteration (Halko, Martinsson & Tropp 2011, Alg. 4.4 with q = 1 started from Ũ
// instead of a Gaussian block), which damps what the Gram matrix got wrong by
// σ_{c+1}/σ_rank, and is exact when rank(A) ≤ c: range(AᵀŨ) ⊆ range(Aᵀ) for any Ũ.
// Costs 2·m²·n + 4·m·n·c flops in three wide GEMMs — cheaper than the Krylov
// recurrence once its space would cover a large part of the short side (batches
// of wide matrices: many small, narrow, sequential products and per-block
// orthonormalisation there).  Deterministic: no random start block.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> rsvd_gram(const at::Tensor& A, int64_t rank,
                                                                 int64_t oversample) {
  if (A.size(-2) > A.size(-1)) {
    auto [U, S, Vh] = rsvd_gram(A.mT(), rank, oversample);
    return std::make_tuple(Vh.mT().contiguous(), S, U.mT().contiguous());
  }
  const int64_t m = A.size(-2);
  const int64_t c = std::min(rank + oversample, m);
  at::Tensor V = std::get<1>(gram_eigh(A, rank));  // eigenvalues ascending
  at::Tensor Z = orthonormalize(at::matmul(A.mT(), V.narrow(-1, m - c, c)));  // n × c
  auto [Uw, S, Vwh] = at::linalg_svd(at::matmul(A, Z), /*full_matrices=*/false);  // of the m × c matrix A·Z
  at::Tensor Vh = at::matmul(Vwh.narrow(-2, 0, rank), Z.mT());
  return std::make_tuple(Uw.narrow(-1, 0, rank).contiguous(), S.narrow(-1, 0, rank).contiguous(), Vh.contiguous());
}

// The exact thin SVD of A through its short side: for m ≤ n (else on Aᵀ)
// Z = orth(Aᵀ) (n × m, CholeskyQR2 with the Householder fallback: orthonormalize),
// so A = (A·Z)·Zᵀ exactly, and the SVD of the m × m matrix A·Z = U·S·V_Mᵀ gives
// Vh = V_Mᵀ·Zᵀ.  Backward stable like LAPACK's own (errors u·‖A‖), and much
// faster on short, wide matrices: measured (fp32, 2 threads) at 128 × 4096 gesdd
// takes 16.8 ms, a Householder QR of Aᵀ plus an m × m SVD 6.9 ms.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> short_side_svd(const at::Tensor& A) {
  const bool tall = A.size(-2) > A.size(-1);
  const at::Tensor W = tall ? A.mT() : A;  // m ≤ n
  const at::Tensor Z = orthonormalize(W.mT());  // n × m
  auto [Um, S, Vmh] = at::linalg_svd(at::matmul(W, Z), /*full_matrices=*/false);
  const at::Tensor Vh = at::matmul(Vmh, Z.mT());
  if (tall) return std::make_tuple(Vh.mT(), S, Um.mT());  // A = Wᵀ = Vhᵀ·S·Umᵀ
  return std::make_tuple(Um, S, Vh);
}

// The truncated SVD of A ≈ Q·B, B = QᵀA (L × n, rows given), without a QR of
// the n × L matrix Bᵀ: the top-k eigenpairs (λᵢ, uᵢ) of the L × L Gram matrix
// G = B·Bᵀ (one GEMM, an L × L eigh) give the left singular vectors U_k of B,
// B is projected on them, U_k·(U_kᵀ·B), and that rank-k matrix factored exactly.
// The rows of C = U_kᵀ·B are orthogonal with norms σᵢ = √λᵢ up to G's rounding,
// so C' = Σ⁻¹·C is orthonormal to within ‖C'C'ᵀ − I‖ ~ u·σ₁²/σ_k²: one CholeskyQR
// round, C'·C'ᵀ = L·Lᵀ, makes it orthonormal to O(u) (the second-round analysis
// of CholeskyQR2, Yamamoto et al. 2015, which needs ‖C'C'ᵀ − I‖_F ≤ 1/2 — checked),
// Z = C'ᵀ·L⁻ᵀ (n × k), and C = Σ·L·Zᵀ, so the k × k SVD of M = Σ·L = U_M·S·V_Mᵀ
// gives A ≈ (Q·U_k·U_M)·S·(V_Mᵀ·Zᵀ), Zᵀ = L⁻¹·C'.  Where that check fails (σ_k ≈ 0: B of rank
// < k) Z = orth(Cᵀ) by CholeskyQR2/Householder and M = C·Z.  The Gram matrix is
// formed in the compute dtype: its rounding (u·‖B‖²) perturbs U_k by angles
// ~ u·σ₁²/gap, which changes the projection's error only to second order and its
// orthonormality not at all (Z and U_M are orthonormal whatever U_k is), as long
// as the k-th direction is resolved at all — for fp32 that needs σ_k well above
// √u·σ₁, else G is formed again in fp64.  Measured at L = 192, k = 64 on
// 4096 × 14336 (with the n × k basis Z still formed): 11.4 ms of the call's 219.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> rayleigh_ritz_gram(const at::Tensor& Q, const at::Tensor& B,
                                                                        int64_t rank) {
  const int64_t L = B.size(-2);
  auto [evals, evecs] = gram_eigh(B, rank);  // ascending eigenvalues
  const at::Tensor Uk = evecs.narrow(-1, L - rank, rank).flip(-1);  // L × k, largest first
  const at::Tensor sigma = evals.narrow(-1, L - rank, rank).flip(-1).clamp_min(0).sqrt();  // (…, k)
  const auto eye = at::eye(rank, B.options());
  // C' = Σ⁻¹·U_kᵀ·B (the scaling folded into the small U_k); σ = 0 gives Inf/NaN, which fails the check.
  const at::Tensor Cs = at::matmul((Uk / sigma.unsqueeze(-2)).mT(), B);  // k × n
  const at::Tensor Gs = at::matmul(Cs, Cs.mT());
  if (near_identity(Gs, eye)) {
    auto [Lc, info] = at::linalg_cholesky_ex(Gs);
    if (!cholesky_failed(info)) {
      // Z = C'ᵀ·L⁻ᵀ is never formed: Vh = V_Mᵀ·Zᵀ = (V_Mᵀ·L⁻¹)·C', a k × k factor
      // (L ≈ I) applied to the k × n rows.
      auto [Um, S, Vmh] = at::linalg_svd(sigma.unsqueeze(-1) * Lc, /*full_matrices=*/false);  // M = Σ·L
      const at::Tensor Linv = at::linalg_solve_triangular(Lc, eye, /*upper=*/false);
      return std::make_tuple(at::matmul(Q, at::matmul(Uk, Um)).contiguous(), S.contiguous(),
                             at::matmul(at::matmul(Vmh, Linv), Cs).contiguous());
    }
  }
  const at::Tensor C = at::matmul(Uk.mT(), B);  // k × n
  const at::Tensor Z = orthonormalize(C.mT());  // n × k
  auto [Um, S, Vmh] = at::linalg_svd(at::matmul(C, Z), /*full_matrices=*/false);  // k × k
  return std::make_tuple(at::matmul(Q, at::matmul(Uk, Um)).contiguous(), S.contiguous(),
                         at::matmul(Vmh, Z.mT()).contiguous());
}

// Randomized truncated SVD by block Krylov: Musco & Musco (2015) Alg. 2 — the
// orthonormal basis Q of K = [AΩ, (AAᵀ)AΩ, …, (AAᵀ)^{d−1}AΩ] and A ≈ Q·(QᵀA) —
// built as a block Lanczos-type recurrence with full reorthogonalisation of Q:
//   Yᵢ = A·Pᵢ,  Qᵢ = orth(Yᵢ ⊥ Q₀…Qᵢ₋₁),  Wᵢ = Aᵀ·Qᵢ,  Pᵢ₊₁ = (a well-conditioned basis of) Wᵢ.
// Every product is used twice: the Wᵢ are the rows of QᵀA, so the final
// Rayleigh–Ritz needs no extra pass — 2d passes over A in all.  The SVD of QᵀA
// comes from rayleigh_ritz_gram.
// Pᵢ only has to be well-conditioned (it is never part of the result), so one
// CholeskyQR round suffices there; Q is orthonormalised by BCGS2 (see above).
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> rsvd_impl(const at::Tensor& A_in, int64_t rank,
                                                                int64_t oversample, int64_t n_iter, int64_t seed) {
  check_rsvd(A_in, rank, oversample, n_iter);
  const auto dt = compute_dtype(A_in.scalar_type());
  const at::Tensor A = A_in.to(dt);
  const int64_t m = A.size(-2), n = A.size(-1), kmin = std::min(m, n);
  const auto batch = A.sizes().slice(0, A.dim() - 2);
  const KrylovPlan plan = rsvd_plan(rank, oversample, n_iter);

  auto truncate = [&](const at::Tensor& U, const at::Tensor& S, const at::Tensor& Vh) {
    return std::make_tuple(U.narrow(-1, 0, rank).contiguous(), S.narrow(-1, 0, rank).contiguous(),
                           Vh.narrow(-2, 0, rank).contiguous());
  };
  if (plan.block * plan.depth >= kmin || A.numel() == 0) {
    // The Krylov space would span all of min(m, n): the exact SVD costs no more —
    // through the short side for a wide (or tall) A, which LAPACK runs slowly.
    check_finite(A, "lowrank_ops::rsvd", "`A`");
    if (A.numel() > 0 && std::max(m, n) >= 2 * kmin) {
      auto [U, S, Vh] = short_side_svd(A);
      return truncate(U, S, Vh);
    }
    auto [U, S, Vh] = at::linalg_svd(A, /*full_matrices=*/false);
    return truncate(U, S, Vh);
  }
  if (2 * plan.block * plan.depth >= kmin) {
    // The Krylov space would cover at least half of min(m, n): the Gram route is cheaper.
    return rsvd_gram(A, rank, oversample);
  }

  // Ω from a CPU generator: the same numbers for a seed on every device, and one
  // n × b block shared by a whole batch (the analysis is per matrix; Ω only has to
  // be independent of A), so a batch member's result is the one rsvd gives for
  // that matrix alone, up to rounding (the fallbacks below — Householder QR, the
  // fp64 Gram matrix — are decided once for the whole batch).  A Gaussian n × b
  // block with b < n/2 is well-conditioned.
  // P, the right operand of every A·P pass, is kept column-major (a transposed
  // view of b × n rows): MKL runs A·P up to 1.5× faster that way for b = 32–48
  // (A 1024², b = 32: 0.23 against 0.35 ms; 2048², b = 32: 0.97 against 1.31 ms;
  // 1024×4096: 0.93 against 1.31 ms) and the same (±1 %) for b = 16 or 64 at 4096².
  // So Ω is drawn as its b × n transpose (a transposing copy of an n × b draw cost
  // 2.6 ms at 14336 × 64, the draw itself 3.2 ms), and Pbuf below is column-major too.
  auto gen = at::make_generator<at::CPUGeneratorImpl>(static_cast<uint64_t>(seed));
  at::Tensor P = at::randn({plan.block, n}, gen, at::TensorOptions().dtype(dt)).to(A.device()).mT();

  const int64_t b = plan.block, L = plan.block * plan.depth;
  // Bases filled block by block (views of leading columns/rows, no re-concatenation).
  // The Aᵀ-side products are kept transposed, Wtall = Wallᵀ (L × n): Qᵢᵀ·A writes
  // each block as contiguous rows, the orientation BLAS runs fastest (a strided
  // n × b column slice as GEMM output measured ~1.5× slower at 4096², b = 104).
  auto batched = [&](int64_t rows, int64_t cols) {  // an empty (*batch, rows, cols) tensor
    std::vector<int64_t> size(batch.begin(), batch.end());
    size.push_back(rows);
    size.push_back(cols);
    return at::empty(size, A.options());
  };
  at::Tensor Qall = batched(m, L), Wtall = batched(L, n);
  // Scratch reused by every block: fresh m × b and n × b temporaries per block
  // cost page faults whenever the allocator has handed the memory back in between
  // (measured: a 4096 × 64 GEMM output 0.47 ms fresh after a pass over A, 0.23 ms
  // into a kept buffer).
  at::Tensor Ybuf = batched(m, b), work = batched(m, b);
  const at::Tensor Pbuf = plan.depth > 1 ? batched(b, n).mT() : at::Tensor();  // column-major, as P
  const at::Tensor eye = at::eye(b, A.options());
  for (int64_t i = 0; i < plan.depth; ++i) {
    at::Tensor Y = at::matmul_out(Ybuf, A, P);  // pass over A
    if (i == 0) check_finite(Y, "lowrank_ops::rsvd", "`A`", /*derived=*/true);  // every entry of A reaches A·Ω
    const at::Tensor Qi =
        orthonormalize_against(Y, Qall.narrow(-1, 0, i * b), Qall.narrow(-1, i * b, b), eye, work);
    at::Tensor Wti = Wtall.narrow(-2, i * b, b);
    at::matmul_out(Wti, Qi.mT(), A);  // pass over A: (Aᵀ·Qᵢ)ᵀ
    if (i + 1 < plan.depth) P = well_conditioned_basis(Wti.mT(), eye, Pbuf);
  }
  return rayleigh_ritz_gram(Qall, Wtall, rank);  // A ≈ Q·(QᵀA), QᵀA = Wtall
}

// ---------------------------------------------------------------- pivoted QR

// Column-pivoted Householder QR (Businger & Golub 1965) in the blocked form of
// Quintana-Ortí, Sun & Bischof (1998) — the algorithm of LAPACK's xGEQP3/xLAQPS:
// inside a panel of nb columns the trailing matrix is updated lazily
// (A_cur = A − V·Fᵀ, F accumulating τ·Aᵀv), so per column only the pivot
// column and the pivot row are brought up to date (BLAS-2: one Aᵀv), and the
// trailing matrix gets one GEMM per panel (BLAS-3).  Column norms are
// downdated, ‖a_c‖² ← ‖a_c‖² − r_{jc}²; when cancellation makes the downdated
// value unreliable (the test of Drmač & Bujanović 2008, as in LAPACK 3.1+:
// (1 − (r/ν₁)²)·(ν₁/ν₂)² ≤ √ε) the panel ends early and those norms are
// recomputed from the updated columns.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> pivoted_qr_impl(const at::Tensor& A_in,
                                                                      std::optional<int64_t> rank_opt) {
  const char* op = "lowrank_ops::pivoted_qr";
  check_float_input(A_in, op);
  TORCH_CHECK(A_in.dim() == 2, op, ": `A` must have shape (m, n) (batched input is not supported), got ",
              shape_str(A_in));
  const int64_t m = A_in.size(0), n = A_in.size(1), kmin = std::min(m, n);
  int64_t k = kmin;
  if (rank_opt.has_value()) {
    const int64_t r = *rank_opt;
    TORCH_CHECK(r >= 0 && r <= kmin, op, ": `rank` must satisfy 0 <= rank <= min(m, n) = ", kmin,
                " for `A` of shape ", shape_str(A_in), ", got rank=", r);
    k = r;
  }
  const auto dt = compute_dtype(A_in.scalar_type());
  const auto opts = A_in.options().dtype(dt);
  check_finite(A_in, op, "`A`");
  at::Tensor W = A_in.to(dt).contiguous().clone();
  at::Tensor perm = at::arange(n, A_in.options().dtype(at::kLong));
  at::Tensor V = at::zeros({m, k}, opts);
  at::Tensor tau = at::zeros({k}, opts);
  if (k == 0) {
    return std::make_tuple(at::zeros({m, 0}, opts), at::zeros({0, n}, opts), perm);
  }
  const double tol3z = std::sqrt(dt == at::kDouble ? std::numeric_limits<double>::epsilon()
                                                   : static_cast<double>(std::numeric_limits<float>::epsilon()));
  at::Tensor vn1 = at::linalg_vector_norm(W, 2, {0});
  at::Tensor vn2 = vn1.clone();
  constexpr int64_t nb = 32;

  auto swap_cols = [](at::Tensor& T, int64_t a, int64_t b) {  // T[:, a] <-> T[:, b]
    auto tmp = T.select(1, a).clone();
    T.select(1, a).copy_(T.select(1, b));
    T.select(1, b).copy_(tmp);
  };
  auto swap_entries = [](at::Tensor& t, int64_t a, int64_t b) {
    auto tmp = t.select(0, a).clone();
    t.select(0, a).copy_(t.select(0, b));
    t.select(0, b).copy_(tmp);
  };

  int64_t j0 = 0;
  while (j0 < k) {
    const int64_t jb = std::min(nb, k - j0);
    const int64_t nt = n - j0;                 // columns j0..n-1 (local index c - j0)
    at::Tensor F = at::zeros({nt, jb}, opts);  // trailing A_cur = A − V_p·Fᵀ
    int64_t kb = 0;
    bool recompute = false;
    while (kb < jb && !recompute) {
      const int64_t j = j0 + kb;
      const int64_t pvt = j + vn1.narrow(0, j, n - j).argmax().item<int64_t>();
      if (pvt != j) {
        swap_cols(W, j, pvt);
        swap_entries(F, j - j0, pvt - j0);
        swap_entries(perm, j, pvt);
        vn1.select(0, pvt).copy_(vn1.select(0, j));
        vn2.select(0, pvt).copy_(vn2.select(0, j));
      }
      at::Tensor Vp = V.narrow(1, j0, kb).narrow(0, j, m - j);  // earlier reflectors of this panel, rows j..
      at::Tensor col = W.select(1, j).narrow(0, j, m - j);
      if (kb > 0) col.sub_(at::mv(Vp, F.select(0, j - j0).narrow(0, 0, kb)));
      // Householder reflector H = I − τ·v·vᵀ with H·col = β·e₁ (LAPACK xLARFG's convention).
      const double alpha = col.select(0, 0).item<double>();
      const double xnorm = m - j > 1 ? at::linalg_vector_norm(col.narrow(0, 1, m - j - 1), 2).item<double>() : 0.0;
      at::Tensor v = V.select(1, j).narrow(0, j, m - j);
      double t = 0.0, beta = alpha;
      if (xnorm != 0.0) {
        beta = -std::copysign(std::hypot(alpha, xnorm), alpha);
        t = (beta - alpha) / beta;
        v.narrow(0, 1, m - j - 1).copy_(col.narrow(0, 1, m - j - 1)).div_(alpha - beta);
      }
      v.select(0, 0).fill_(1.0);
      tau.select(0, j).fill_(t);
      col.select(0, 0).fill_(beta);
      if (j + 1 < n) {
        // F[:, kb] for the trailing columns j+1..: τ·(A_curᵀ·v) = τ·(Aᵀv − F_p·(V_pᵀv)).
        at::Tensor Wt = W.narrow(1, j + 1, n - j - 1).narrow(0, j, m - j);
        at::Tensor fcol = F.select(1, kb).narrow(0, j + 1 - j0, n - j - 1);
        at::Tensor f = at::mv(Wt.t(), v);
        if (kb > 0) f.sub_(at::mv(F.narrow(0, j + 1 - j0, n - j - 1).narrow(1, 0, kb), at::mv(Vp.t(), v)));
        fcol.copy_(f.mul_(t));
        // Bring row j of the trailing columns up to date: it is row j of R.
        at::Tensor vrow = V.select(0, j).narrow(0, j0, kb + 1);
        at::Tensor rowj = W.select(0, j).narrow(0, j + 1, n - j - 1);
        rowj.sub_(at::mv(F.narrow(0, j + 1 - j0, n - j - 1).narrow(1, 0, kb + 1), vrow));
        // Downdate the trailing norms.
        at::Tensor n1 = vn1.narrow(0, j + 1, n - j - 1);
        at::Tensor n2 = vn2.narrow(0, j + 1, n - j - 1);
        at::Tensor nz = n1.ne(0);
        at::Tensor ratio = at::where(nz, rowj.abs() / n1, at::zeros_like(n1));
        at::Tensor temp = (1 - ratio * ratio).clamp_min(0);
        at::Tensor temp2 = temp * at::where(nz, (n1 / n2).square(), at::zeros_like(n1));
        at::Tensor bad = nz.logical_and(temp2 <= tol3z);
        n1.mul_(at::where(bad, at::ones_like(temp), temp.sqrt()));
        if (bad.any().item<bool>()) {
          recompute = true;
          // Mark with −1; recomputed from the updated columns after the panel's GEMM.
          n1.masked_fill_(bad, -1.0);
        }
      }
      ++kb;
    }
    const int64_t r0 = j0 + kb;
    if (r0 < m && r0 < n) {
      // One GEMM brings the rest up to date: A[r0:, r0:] −= V[r0:, panel]·F[r0:, :kb]ᵀ.
      at::Tensor trail = W.narrow(0, r0, m - r0).narrow(1, r0, n - r0);
      trail.addmm_(V.narrow(0, r0, m - r0).narrow(1, j0, kb), F.narrow(0, r0 - j0, n - r0).narrow(1, 0, kb).t(),
                   1.0, -1.0);
    }
    if (recompute && r0 < n) {
      at::Tensor n1 = vn1.narrow(0, r0, n - r0);
      at::Tensor bad = n1.lt(0);
      at::Tensor fresh = r0 < m ? at::linalg_vector_norm(W.narrow(0, r0, m - r0).narrow(1, r0, n - r0), 2, {0})
                                : at::zeros_like(n1);
      n1.copy_(at::where(bad, fresh, n1));
      at::Tensor n2 = vn2.narrow(0, r0, n - r0);
      n2.copy_(at::where(bad, fresh, n2));
    }
    j0 = r0;
  }
  at::Tensor Q = at::linalg_householder_product(V, tau);
  at::Tensor R = W.narrow(0, 0, k).triu();
  return std::make_tuple(Q.contiguous(), R.contiguous(), perm);
}

}  // namespace linalg_detail
}  // namespace lowrank_ops
