// Device-generic core of factored_svd, svd_update and svd_append: argument
// checks and the "QR both sides + small SVD + rotate" schedule, composed from
// ATen calls (LAPACK/BLAS on CPU, cuSOLVER/cuBLAS on CUDA).  The CPU (.cpp)
// and CUDA (cuda/linalg/svd_update_cuda.cpp) registrations both call these.
//
// Every update writes the new matrix as  [Ul, Ql] · K · [Vl, Qr]ᵀ  with
// [Ul, Ql], [Vl, Qr] orthonormal columns and K small ((k+c) × (k+c)), takes the
// SVD of K and rotates: cost O((m+n)(k+c)² + (k+c)³), never O(m·n).
#pragma once

#include "common.h"
#include "linalg/linalg_common.h"

#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/diag_embed.h>
#include <ATen/ops/linalg_qr.h>
#include <ATen/ops/linalg_svd.h>
#include <ATen/ops/matmul.h>
#include <ATen/ops/sparse_csr_tensor.h>
#include <ATen/ops/zeros.h>
#include <c10/util/accumulate.h>

#include <algorithm>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace lowrank_ops {
namespace svdupd {

using SVD = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using Named = std::pair<const at::Tensor*, const char*>;

using lowrank_ops::shape_str;

inline std::string dims_str(at::IntArrayRef d) {
  std::string s = "(";
  for (size_t i = 0; i < d.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(d[i]);
  }
  return s + ")";
}

inline void check_float(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.layout() == at::kStrided, op, ": `", name, "` must be a dense (strided) tensor, got layout ",
              t.layout());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": `", name,
              "` must be a floating tensor (float64/float32/bfloat16/float16), got ", t.scalar_type());
}

// `t` shares dtype and device with the reference argument `ref` (named `ref_name`).
inline void check_same(const at::Tensor& ref, const char* ref_name, const at::Tensor& t, const char* op,
                       const char* name) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": `", name, "` has dtype ", t.scalar_type(), " but `",
              ref_name, "` has dtype ", ref.scalar_type(), "; all tensors must share one dtype");
  TORCH_CHECK(t.device() == ref.device(), op, ": `", name, "` is on ", t.device(), " but `", ref_name, "` is on ",
              ref.device(), "; all tensors must be on one device");
}

// Leading (batch) dims of a matrix argument must equal `batch`.
inline void check_batch(at::IntArrayRef batch, const at::Tensor& t, int64_t trailing, const char* op,
                        const char* name, const char* expected) {
  TORCH_CHECK(t.dim() == static_cast<int64_t>(batch.size()) + trailing &&
                  t.sizes().slice(0, batch.size()) == batch,
              op, ": `", name, "` must have shape ", expected, " with leading dims ", dims_str(batch),
              ", got ", shape_str(t));
}

using lowrank_ops::compute_dtype;

inline at::Tensor narrow_last(const at::Tensor& t, int64_t start, int64_t len) { return t.narrow(-1, start, len); }
inline at::Tensor narrow_rows(const at::Tensor& t, int64_t start, int64_t len) { return t.narrow(-2, start, len); }

// Orthogonal complement of P (..., L, c) against the orthonormal columns of
// B (..., L, k):  P = B·X + Q·R  with Q (..., L, p) orthonormal and Q ⊥ B,
// p = min(L − k, c).  X by classical Gram–Schmidt applied twice ("twice is
// enough", Giraud et al. 2005), so the residual E is orthogonal to B to working
// precision even when P lies almost in span(B); Q from a Householder QR of
// [B, E], which stays orthonormal and orthogonal to B when E is rank deficient
// (its R rows are then ~0).
struct Complement {
  at::Tensor X, Q, R;
};

inline Complement orth_complement(const at::Tensor& B, const at::Tensor& P) {
  const auto Bt = B.mT();
  at::Tensor X = at::matmul(Bt, P);
  at::Tensor E = P - at::matmul(B, X);
  at::Tensor X2 = at::matmul(Bt, E);
  E = E - at::matmul(B, X2);
  X = X + X2;
  const int64_t L = P.size(-2), c = P.size(-1), k = B.size(-1);
  // [B, Q] must stay orthonormal, so Q gets at most L − k columns: with k + c > L
  // (e.g. appending many rows to a short spectrum) a QR of E alone would return
  // columns inside span(B) whenever E is rank deficient.  Householder QR of [B, E]
  // with B first gives an orthonormal completion of span(B) exactly; the columns
  // after the first k are the complement basis.
  const int64_t p = std::max<int64_t>(std::min(L, k + c) - k, 0);
  if (p == 0) {
    std::vector<int64_t> qs(P.sizes().begin(), P.sizes().end());
    qs.back() = 0;
    std::vector<int64_t> rs(P.sizes().begin(), P.sizes().end() - 2);
    rs.push_back(0);
    rs.push_back(c);
    return {X, at::zeros(qs, P.options()), at::zeros(rs, P.options())};
  }
  if (p == c) {
    // E is already ⊥ B; CholeskyQR twice with one more projection between the
    // rounds (BCGS2's cholqr2_projected, linalg_common.h) orthonormalises it in a few
    // small GEMMs, where its Gram matrices say that is accurate: the first Cholesky
    // succeeds with no pivot below 1e3·u of the largest (κ(E) up to ~1/√(1e3·u), 130
    // in fp32), and ‖G₂ − I‖_F ≤ 1/2.  A numerically rank-deficient E (repeated update columns)
    // has a pivot ~u and takes the Householder route below, which completes the
    // basis orthogonally to B.  (Measured, 4096 × 64 basis, c = 16: the Householder
    // QR of [B, E] took 2.7 ms of svd_update's 7.9.)
    const at::Tensor eye = at::eye(c, E.options());
    const double u = E.scalar_type() == at::kDouble ? std::numeric_limits<double>::epsilon()
                                                    : static_cast<double>(std::numeric_limits<float>::epsilon());
    at::Tensor Q, redo;
    if (linalg_detail::cholqr2_projected(E, B, eye, Q, redo, at::Tensor(), at::Tensor(), 1e3 * u)) {
      return {X, Q, at::matmul(Q.mT(), E)};
    }
  }
  at::Tensor Qf = std::get<0>(at::linalg_qr(at::cat({B, E}, -1), "reduced"));
  at::Tensor Q = Qf.narrow(-1, k, p);
  at::Tensor R = at::matmul(Q.mT(), E);
  return {X, Q, R};
}

// Thin SVD of the small core, truncated to `rank`.  Every entry of the inputs
// reaches K, so a NaN or Inf anywhere raises here (linalg_common.h's policy).
inline SVD small_svd(const at::Tensor& K, int64_t rank, const char* op) {
  linalg_detail::check_finite(K, op, "the input", /*derived=*/true);
  auto [Uk, Sk, Vkh] = at::linalg_svd(K, /*full_matrices=*/false);
  return {narrow_last(Uk, 0, rank), narrow_last(Sk, 0, rank), narrow_rows(Vkh, 0, rank)};
}

// Empty-result shortcut (rank 0 or an empty batch): correctly shaped zeros.
inline SVD empty_svd(at::IntArrayRef batch, int64_t m, int64_t n, int64_t rank, const at::TensorOptions& o) {
  std::vector<int64_t> b(batch.begin(), batch.end());
  auto with = [&](std::initializer_list<int64_t> tail) {
    std::vector<int64_t> s = b;
    s.insert(s.end(), tail);
    return at::zeros(s, o);
  };
  return {with({m, rank}), with({rank}), with({rank, n})};
}

inline SVD contiguous(SVD r) {
  return {std::get<0>(r).contiguous(), std::get<1>(r).contiguous(), std::get<2>(r).contiguous()};
}

// ---------------------------------------------------------------------------- factored_svd

// B·diag(w)·A = Q_B · (R_B·diag(w)·R_Aᵀ) · Q_Aᵀ with B = Q_B·R_B, Aᵀ = Q_A·R_A;
// the SVD of the small middle factor gives the SVD of the product exactly.
inline SVD factored_svd_impl(const at::Tensor& B, const at::Tensor& A, const std::optional<at::Tensor>& weights,
                             std::optional<int64_t> rank) {
  constexpr const char* op = "factored_svd";
  check_float(B, op, "B");
  check_float(A, op, "A");
  check_same(B, "B", A, op, "A");
  TORCH_CHECK(B.dim() >= 2, op, ": `B` must have shape (..., m, R), got ", shape_str(B));
  const auto batch = B.sizes().slice(0, B.dim() - 2);
  const int64_t m = B.size(-2), R = B.size(-1);
  check_batch(batch, A, 2, op, "A", "(..., R, n)");
  TORCH_CHECK(A.size(-2) == R, op, ": `A` must have shape (..., R, n) with R = ", R, " (the columns of `B` ",
              shape_str(B), "), got ", shape_str(A));
  const int64_t n = A.size(-1);
  if (weights.has_value()) {
    const auto& w = *weights;
    check_float(w, op, "weights");
    check_same(B, "B", w, op, "weights");
    TORCH_CHECK((w.dim() == 1 && w.size(0) == R) ||
                    (w.dim() == B.dim() - 1 && w.sizes().slice(0, batch.size()) == batch && w.size(-1) == R),
                op, ": `weights` must have shape (R,) = (", R, ",) or (..., R) with leading dims ", dims_str(batch),
                ", got ", shape_str(w));
  }
  const int64_t kmax = std::min({m, n, R});
  const int64_t r = rank.value_or(kmax);
  TORCH_CHECK(r >= 0 && r <= kmax, op, ": `rank` must be in [0, min(m, n, R)] = [0, ", kmax, "] for `B` ",
              shape_str(B), " and `A` ", shape_str(A), ", got ", r);
  const auto ct = compute_dtype(B.scalar_type());
  const auto opts = B.options().dtype(ct);
  if (r == 0 || c10::multiply_integers(batch) == 0) return empty_svd(batch, m, n, r, opts);

  auto [QB, RB] = at::linalg_qr(B.to(ct), "reduced");        // (m, p), (p, R)
  auto [QA, RA] = at::linalg_qr(A.to(ct).mT(), "reduced");   // (n, q), (q, R)
  if (weights.has_value()) RB = RB * weights->to(ct).unsqueeze(-2);
  auto [Uk, Sk, Vkh] = small_svd(at::matmul(RB, RA.mT()), r, op);
  return contiguous({at::matmul(QB, Uk), Sk, at::matmul(Vkh, QA.mT())});
}

// ---------------------------------------------------------------------------- svd_update

// Checks of a truncated SVD (U, S, Vh) passed in: float dtypes, one device,
// U (..., m, k), S (..., k), Vh (..., k, n) with the same leading dims.
struct UsvShapes {
  int64_t m, n, k;
};

inline UsvShapes check_usv(const at::Tensor& U, const at::Tensor& S, const at::Tensor& Vh, const char* op) {
  check_float(U, op, "U");
  for (const Named& a : {Named{&S, "S"}, Named{&Vh, "Vh"}}) {
    check_float(*a.first, op, a.second);
    check_same(U, "U", *a.first, op, a.second);
  }
  TORCH_CHECK(U.dim() >= 2, op, ": `U` must have shape (..., m, k), got ", shape_str(U));
  const auto batch = U.sizes().slice(0, U.dim() - 2);
  const int64_t m = U.size(-2), k = U.size(-1);
  check_batch(batch, S, 1, op, "S", "(..., k)");
  TORCH_CHECK(S.size(-1) == k, op, ": `S` must have shape (..., k) with k = ", k, " (columns of `U` ",
              shape_str(U), "), got ", shape_str(S));
  check_batch(batch, Vh, 2, op, "Vh", "(..., k, n)");
  TORCH_CHECK(Vh.size(-2) == k, op, ": `Vh` must have shape (..., k, n) with k = ", k, ", got ", shape_str(Vh));
  return {m, Vh.size(-1), k};
}


// Brand (2006), §2–3: U·S·Vh + P·Qᵀ = [U, Q_P] · K · [V, Q_Q]ᵀ with
// K = [[S, 0], [0, 0]] + [X_P; R_P]·[X_Q; R_Q]ᵀ  (Brand's Eq. 3 with
// m = UᵀP, R_a = ‖(I−UUᵀ)P‖ generalised to c columns by QR).
inline SVD svd_update_impl(const at::Tensor& U, const at::Tensor& S, const at::Tensor& Vh, const at::Tensor& P,
                           const at::Tensor& Q, int64_t rank) {
  constexpr const char* op = "svd_update";
  const UsvShapes f = check_usv(U, S, Vh, op);
  const int64_t m = f.m, n = f.n, k = f.k;
  for (const Named& a : {Named{&P, "P"}, Named{&Q, "Q"}}) {
    check_float(*a.first, op, a.second);
    check_same(U, "U", *a.first, op, a.second);
  }
  const auto batch = U.sizes().slice(0, U.dim() - 2);
  check_batch(batch, P, 2, op, "P", "(..., m, c)");
  TORCH_CHECK(P.size(-2) == m, op, ": `P` must have shape (..., m, c) with m = ", m, " (rows of `U`), got ",
              shape_str(P));
  const int64_t c = P.size(-1);
  check_batch(batch, Q, 2, op, "Q", "(..., n, c)");
  TORCH_CHECK(Q.size(-2) == n && Q.size(-1) == c, op, ": `Q` must have shape (..., n, c) = (..., ", n, ", ", c,
              ") to match `Vh` ", shape_str(Vh), " and `P` ", shape_str(P), ", got ", shape_str(Q));
  const int64_t kmax = std::min({m, n, k + c});
  TORCH_CHECK(rank >= 0 && rank <= kmax, op, ": `rank` must be in [0, min(m, n, k + c)] = [0, ", kmax, "], got ",
              rank);
  const auto ct = compute_dtype(U.scalar_type());
  if (rank == 0 || c10::multiply_integers(batch) == 0) return empty_svd(batch, m, n, rank, U.options().dtype(ct));

  const at::Tensor Uc = U.to(ct), Sc = S.to(ct), Vc = Vh.to(ct).mT();
  auto cp = orth_complement(Uc, P.to(ct));
  auto cq = orth_complement(Vc, Q.to(ct));
  at::Tensor K = at::matmul(at::cat({cp.X, cp.R}, -2), at::cat({cq.X, cq.R}, -2).mT());
  K.narrow(-2, 0, k).narrow(-1, 0, k).add_(at::diag_embed(Sc));
  auto [Uk, Sk, Vkh] = small_svd(K, rank, op);
  const int64_t pp = cp.Q.size(-1), pq = cq.Q.size(-1);
  at::Tensor Un = at::matmul(Uc, narrow_rows(Uk, 0, k)) + at::matmul(cp.Q, narrow_rows(Uk, k, pp));
  at::Tensor Vhn = at::matmul(narrow_last(Vkh, 0, k), Vc.mT()) + at::matmul(narrow_last(Vkh, k, pq), cq.Q.mT());
  return contiguous({Un, Sk, Vhn});
}

// ---------------------------------------------------------------------------- svd_append

inline int64_t normalize_dim(int64_t dim, const char* op) {
  TORCH_CHECK(dim == 0 || dim == 1 || dim == -1 || dim == -2, op,
              ": `dim` must be 1 (append columns) or 0 (append rows), got ", dim);
  return dim < 0 ? dim + 2 : dim;
}

// Zha & Simon (1999), Eq. (2.3) for new columns: [Bb·S·Oh, C] =
// [Bb, Q_C] · [[S, X], [0, R_C]] · blockdiag(Oh, I_c), with C = Bb·X + Q_C·R_C.
// Bb (..., L, k) orthonormal columns, Oh (..., k, N) orthonormal rows, C (..., L, c).
inline SVD append_columns(const at::Tensor& Bb, const at::Tensor& S, const at::Tensor& Oh, const at::Tensor& C,
                          int64_t rank, const char* op) {
  const int64_t k = Bb.size(-1);
  auto cc = orth_complement(Bb, C);
  const int64_t p = cc.Q.size(-1);
  std::vector<int64_t> zs(cc.R.sizes().begin(), cc.R.sizes().end());
  zs.back() = k;
  at::Tensor top = at::cat({at::diag_embed(S), cc.X}, -1);
  at::Tensor bottom = at::cat({at::zeros(zs, cc.R.options()), cc.R}, -1);
  auto [Uk, Sk, Vkh] = small_svd(at::cat({top, bottom}, -2), rank, op);
  linalg_detail::check_finite(Oh, op, "the input");  // the one factor that does not reach the core
  at::Tensor Un = at::matmul(Bb, narrow_rows(Uk, 0, k)) + at::matmul(cc.Q, narrow_rows(Uk, k, p));
  at::Tensor Vhn = at::cat({at::matmul(narrow_last(Vkh, 0, k), Oh), narrow_last(Vkh, k, C.size(-1))}, -1);
  return {Un, Sk, Vhn};
}

// Shapes of one svd_append call; `c` is the number of appended columns/rows.
struct AppendShapes {
  int64_t m, n, k, dim;
};

inline AppendShapes check_append_factors(const at::Tensor& U, const at::Tensor& S, const at::Tensor& Vh,
                                         int64_t dim, const char* op) {
  const UsvShapes f = check_usv(U, S, Vh, op);
  return {f.m, f.n, f.k, normalize_dim(dim, op)};
}

inline void check_append_rank(const AppendShapes& s, int64_t c, int64_t rank, const char* op) {
  const int64_t rows = s.m + (s.dim == 0 ? c : 0), cols = s.n + (s.dim == 1 ? c : 0);
  const int64_t kmax = std::min({rows, cols, s.k + c});
  TORCH_CHECK(rank >= 0 && rank <= kmax, op, ": `rank` must be in [0, min(rows, cols, k + c)] = [0, ", kmax,
              "] for the ", rows, " x ", cols, " appended matrix, got ", rank);
}

inline SVD svd_append_impl(const at::Tensor& U, const at::Tensor& S, const at::Tensor& Vh, const at::Tensor& C,
                           int64_t rank, int64_t dim) {
  constexpr const char* op = "svd_append";
  auto s = check_append_factors(U, S, Vh, dim, op);
  check_float(C, op, "C");
  check_same(U, "U", C, op, "C");
  const auto batch = U.sizes().slice(0, U.dim() - 2);
  if (s.dim == 1) {
    check_batch(batch, C, 2, op, "C", "(..., m, c) for dim=1");
    TORCH_CHECK(C.size(-2) == s.m, op, ": with dim=1 `C` must have shape (..., m, c) with m = ", s.m,
                " (rows of `U`), got ", shape_str(C));
  } else {
    check_batch(batch, C, 2, op, "C", "(..., c, n) for dim=0");
    TORCH_CHECK(C.size(-1) == s.n, op, ": with dim=0 `C` must have shape (..., c, n) with n = ", s.n,
                " (columns of `Vh`), got ", shape_str(C));
  }
  const int64_t c = s.dim == 1 ? C.size(-1) : C.size(-2);
  check_append_rank(s, c, rank, op);
  const auto ct = compute_dtype(U.scalar_type());
  const int64_t rows = s.m + (s.dim == 0 ? c : 0), cols = s.n + (s.dim == 1 ? c : 0);
  if (rank == 0 || c10::multiply_integers(batch) == 0) return empty_svd(batch, rows, cols, rank, U.options().dtype(ct));
  const at::Tensor Uc = U.to(ct), Sc = S.to(ct), Vhc = Vh.to(ct), Cc = C.to(ct);
  if (s.dim == 1) return contiguous(append_columns(Uc, Sc, Vhc, Cc, rank, op));
  // New rows of M are new columns of Mᵀ = V·S·Uᵀ.
  auto [U2, S2, Vh2] = append_columns(Vhc.mT(), Sc, Uc.mT(), Cc.mT(), rank, op);
  return contiguous({Vh2.mT(), S2, U2.mT()});
}


// ---------------------------------------------------------------------------- sparse svd_append

// The appended vectors as CSR rows: a (c, L) matrix whose row i is new column
// i (dim=1, L = m) or new row i (dim=0, L = n).  Returns c.
inline int64_t check_sparse_rows(const at::Tensor& U, const AppendShapes& s, const at::Tensor& crow,
                                 const at::Tensor& col, const at::Tensor& val, const char* op) {
  TORCH_CHECK(U.dim() == 2, op, ": the sparse path takes unbatched factors, `U` must have shape (m, k), got ",
              shape_str(U));
  TORCH_CHECK(crow.dim() == 1 && crow.numel() >= 1 && (crow.scalar_type() == at::kLong || crow.scalar_type() == at::kInt),
              op, ": `crow` must be a 1-D int32/int64 tensor of c + 1 row offsets, got ", crow.scalar_type(), " ",
              shape_str(crow));
  TORCH_CHECK(col.dim() == 1 && col.scalar_type() == crow.scalar_type(), op,
              ": `col` must be a 1-D tensor of column indices with `crow`'s dtype ", crow.scalar_type(), ", got ",
              col.scalar_type(), " ", shape_str(col));
  check_float(val, op, "val");
  check_same(U, "U", val, op, "val");
  TORCH_CHECK(crow.device() == U.device() && col.device() == U.device(), op,
              ": `crow` and `col` must be on `U`'s device ", U.device());
  TORCH_CHECK(val.dim() == 1 && val.numel() == col.numel(), op, ": `val` must have shape (nnz,) = (", col.numel(),
              ",) like `col`, got ", shape_str(val));
  const int64_t c = crow.numel() - 1;
  const int64_t L = s.dim == 1 ? s.m : s.n;
  const at::Tensor crow64 = crow.to(at::kLong).cpu();
  const int64_t* cp = crow64.const_data_ptr<int64_t>();
  TORCH_CHECK(cp[0] == 0 && cp[c] == col.numel(), op, ": `crow` must start at 0 and end at nnz = ", col.numel(),
              ", got ", cp[0], " and ", cp[c]);
  for (int64_t i = 0; i < c; ++i)
    TORCH_CHECK(cp[i] <= cp[i + 1], op, ": `crow` must be non-decreasing, got crow[", i, "] = ", cp[i],
                " > crow[", i + 1, "] = ", cp[i + 1]);
  if (col.numel() > 0) {
    const int64_t lo = col.min().item<int64_t>(), hi = col.max().item<int64_t>();
    TORCH_CHECK(lo >= 0 && hi < L, op, ": `col` indices must be in [0, ", L, ") (", s.dim == 1 ? "rows of `U`" : "columns of `Vh`",
                "), got range [", lo, ", ", hi, "]");
  }
  return c;
}

// Device-generic sparse path: densify the (c, L) update (never the m×n
// matrix, never the complement's basis in a sparse-aware way) and run the
// dense update.  Used where no sparse kernel exists (CUDA).
inline SVD svd_append_sparse_densified(const at::Tensor& U, const at::Tensor& S, const at::Tensor& Vh,
                                       const at::Tensor& crow, const at::Tensor& col, const at::Tensor& val,
                                       int64_t rank, int64_t dim) {
  constexpr const char* op = "svd_append_sparse";
  auto s = check_append_factors(U, S, Vh, dim, op);
  const int64_t c = check_sparse_rows(U, s, crow, col, val, op);
  const int64_t L = s.dim == 1 ? s.m : s.n;
  at::Tensor rows = at::sparse_csr_tensor(crow, col, val, {c, L}, val.options().layout(at::kSparseCsr)).to_dense();
  return svd_append_impl(U, S, Vh, s.dim == 1 ? rows.mT() : rows, rank, s.dim);
}

}  // namespace svdupd
}  // namespace lowrank_ops
