// CPU kernels of svd_append (Zha & Simon 1999) and its sparse-update variant.
//
// Dense C: the device-generic schedule in svd_update_common.h (CGS2 + QR of
// the complement of C, SVD of the (k+c)² core, rotate).
//
// Sparse C (svd_append_sparse): after "Fast Updating Truncated SVD for
// Representation Learning with Sparse Matrices" (Deng et al., ICLR 2024): the
// complement E = C − B·X (X = BᵀC) is never formed.  Everything it is needed
// for is taken in the small space:
//   X    = Bᵀ·C        sparse × dense, O(nnz·k)
//   EᵀE  = CᵀC − 2·XᵀX + Xᵀ(BᵀB)X   sparse Gram, O(c·(nnz + L) + L·k²), in fp64
//   EᵀE  = W·Λ·Wᵀ      (c×c eigen), so E = Q_E·(Σ·Wᵀ) with Q_E = E·W·Σ⁻¹ implicit
// and the new left basis [B, Q_E]·U_K = B·(U_K,top − X·Z) + C·Z with
// Z = W·Σ⁻¹·U_K,bot: one GEMM with B plus one sparse scatter, O(L·k·r + nnz·r).
// The Gram formula keeps the Xᵀ(BᵀB)X term rather than assuming BᵀB = I: an fp32
// basis is orthonormal only to ~ε₃₂, and CᵀC − XᵀX then leaves spurious
// eigenvalues ~ε₃₂·‖C‖² (directions with σ ~ 3e-4·‖C‖ that are not in E, which
// made Q_E far from orthonormal when C lay in span(B)); with BᵀB formed in fp64 the
// Gram matrix is exact to ε₆₄·‖C‖² for either compute dtype.
// Directions of E with σ ≤ 1e-7·‖C‖_F are dropped: the Gram cancellation
// leaves them at rounding level (√ε₆₄·‖C‖), and keeping them would make Q_E
// non-orthogonal.  So the sparse path is exact up to ~1e-7·‖C‖_F absolute
// (the dense path is backward-stable), below fp32's own rounding of the factors.
#include <torch/library.h>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/linalg_eigh.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>

#include "linalg/svd_update_common.h"
#include "ops.h"

#include <cmath>
#include <optional>
#include <vector>

namespace lowrank_ops {
namespace {

using svdupd::SVD;

// Y (c, k) fp64 = Csr (c, L) · B (L, k); B row-major contiguous.
template <typename scalar_t>
at::Tensor csr_times_dense(const int64_t* crow, const int64_t* col, const scalar_t* val, const scalar_t* B,
                           int64_t c, int64_t k) {
  at::Tensor Y = at::zeros({c, k}, at::TensorOptions().dtype(at::kDouble));
  double* y = Y.data_ptr<double>();
  at::parallel_for(0, c, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      double* yi = y + i * k;
      for (int64_t p = crow[i]; p < crow[i + 1]; ++p) {
        const double v = static_cast<double>(val[p]);
        const scalar_t* b = B + col[p] * k;
        for (int64_t j = 0; j < k; ++j) yi[j] += v * static_cast<double>(b[j]);
      }
    }
  });
  return Y;
}

// G (c, c) fp64 = Csr · Csrᵀ: row i scattered into a dense workspace, dotted with every row j ≥ i.
template <typename scalar_t>
at::Tensor csr_gram(const int64_t* crow, const int64_t* col, const scalar_t* val, int64_t c, int64_t L) {
  at::Tensor G = at::zeros({c, c}, at::TensorOptions().dtype(at::kDouble));
  double* g = G.data_ptr<double>();
  at::parallel_for(0, c, 1, [&](int64_t i0, int64_t i1) {
    std::vector<double> w(L, 0.0);
    for (int64_t i = i0; i < i1; ++i) {
      for (int64_t p = crow[i]; p < crow[i + 1]; ++p) w[col[p]] += static_cast<double>(val[p]);
      for (int64_t j = i; j < c; ++j) {
        double acc = 0.0;
        for (int64_t p = crow[j]; p < crow[j + 1]; ++p) acc += static_cast<double>(val[p]) * w[col[p]];
        g[i * c + j] = acc;
        g[j * c + i] = acc;
      }
      for (int64_t p = crow[i]; p < crow[i + 1]; ++p) w[col[p]] = 0.0;
    }
  });
  return G;
}

// out (L, r) += Csrᵀ · Z (c, r).  Threads own disjoint column slices of out
// (a scatter over rows of Csr would race on shared columns).
template <typename scalar_t>
void csr_t_times_dense_add(const int64_t* crow, const int64_t* col, const scalar_t* val, const scalar_t* Z,
                           scalar_t* out, int64_t c, int64_t r) {
  const int64_t grain = std::max<int64_t>(8, r / std::max(1, at::get_num_threads()));
  at::parallel_for(0, r, grain, [&](int64_t j0, int64_t j1) {
    for (int64_t i = 0; i < c; ++i) {
      const scalar_t* zi = Z + i * r;
      for (int64_t p = crow[i]; p < crow[i + 1]; ++p) {
        const scalar_t v = val[p];
        scalar_t* o = out + col[p] * r;
        for (int64_t j = j0; j < j1; ++j) o[j] += v * zi[j];
      }
    }
  });
}

// Columns appended to Bb (L, k) · diag(S) · Oh (k, N): the c sparse vectors are rows of Csr (c, L).
// nullopt when `rank` exceeds k + (numerical rank of E): the trailing triplets
// have σ = 0 and need an orthonormal completion, which the dense path supplies.
template <typename scalar_t>
std::optional<SVD> append_sparse_columns(const at::Tensor& Bb, const at::Tensor& S, const at::Tensor& Oh, const at::Tensor& crow,
                          const at::Tensor& col, const at::Tensor& val, int64_t rank) {
  const int64_t L = Bb.size(0), k = Bb.size(1), c = crow.numel() - 1;
  const at::Tensor B = Bb.contiguous();
  const int64_t* cr = crow.const_data_ptr<int64_t>();
  const int64_t* cl = col.const_data_ptr<int64_t>();
  const scalar_t* v = val.const_data_ptr<scalar_t>();
  const at::Tensor Xt = csr_times_dense<scalar_t>(cr, cl, v, B.const_data_ptr<scalar_t>(), c, k);  // (c, k) = Xᵀ
  const at::Tensor G = csr_gram<scalar_t>(cr, cl, v, c, L);
  const at::Tensor B64 = B.to(at::kDouble);
  const at::Tensor XtM = at::mm(Xt, at::mm(B64.t(), B64));  // Xᵀ·(BᵀB), (c, k)
  // EᵀE = G − 2·XᵀX + Xᵀ(BᵀB)X = G + (XᵀBᵀB − 2·Xᵀ)·X
  const at::Tensor H = at::addmm(G, XtM.sub(Xt, 2.0), Xt.t());
  linalg_detail::check_finite(H, "svd_append_sparse", "the input", /*derived=*/true);
  auto [lam, W] = at::linalg_eigh(H);
  const double tau = 1e-7 * std::sqrt(std::max(0.0, G.trace().item<double>()));
  const at::Tensor keep = (lam > tau * tau).nonzero().flatten();
  const at::Tensor sig = lam.index_select(0, keep).sqrt();  // (p,)
  const at::Tensor Wp = W.index_select(1, keep);             // (c, p)
  const int64_t p = sig.numel();
  if (rank > k + p) return std::nullopt;

  const at::Tensor S64 = S.to(at::kDouble);
  at::Tensor top = at::cat({at::diag_embed(S64), Xt.t()}, 1);                                       // (k, k+c)
  at::Tensor bottom = at::cat({at::zeros({p, k}, G.options()), sig.unsqueeze(1) * Wp.t()}, 1);     // (p, k+c)
  auto [Uk, Sk, Vkh] = svdupd::small_svd(at::cat({top, bottom}, 0), rank, "svd_append_sparse");
  linalg_detail::check_finite(Oh, "svd_append_sparse", "the input");  // the one factor that does not reach the core
  const at::Tensor Z64 = at::mm(Wp / sig.unsqueeze(0), Uk.narrow(0, k, p));                        // (c, r)
  const at::Tensor Y1 = Uk.narrow(0, 0, k) - at::mm(Xt.t(), Z64);                                   // (k, r)

  const auto ct = B.scalar_type();
  at::Tensor Un = at::mm(B, Y1.to(ct)).contiguous();  // (L, r)
  const at::Tensor Z = Z64.to(ct).contiguous();
  csr_t_times_dense_add<scalar_t>(cr, cl, v, Z.const_data_ptr<scalar_t>(), Un.data_ptr<scalar_t>(), c, rank);
  const at::Tensor Vk = Vkh.to(ct);
  at::Tensor Vhn = at::cat({at::mm(Vk.narrow(1, 0, k), Oh), Vk.narrow(1, k, c)}, 1);
  return SVD{Un, Sk.to(ct), Vhn};
}

}  // namespace

SVD svd_append_cpu(const at::Tensor& U, const at::Tensor& S, const at::Tensor& Vh, const at::Tensor& C, int64_t rank,
                   int64_t dim) {
  return svdupd::svd_append_impl(U, S, Vh, C, rank, dim);
}

SVD svd_append_sparse_cpu(const at::Tensor& U, const at::Tensor& S, const at::Tensor& Vh, const at::Tensor& crow,
                          const at::Tensor& col, const at::Tensor& val, int64_t rank, int64_t dim) {
  constexpr const char* op = "svd_append_sparse";
  auto s = svdupd::check_append_factors(U, S, Vh, dim, op);
  const int64_t c = svdupd::check_sparse_rows(U, s, crow, col, val, op);
  svdupd::check_append_rank(s, c, rank, op);
  const auto ct = svdupd::compute_dtype(U.scalar_type());
  const int64_t rows = s.m + (s.dim == 0 ? c : 0), cols = s.n + (s.dim == 1 ? c : 0);
  if (rank == 0) return svdupd::empty_svd({}, rows, cols, 0, U.options().dtype(ct));
  if (c == 0) return svdupd::svd_append_sparse_densified(U, S, Vh, crow, col, val, rank, dim);
  const at::Tensor Uc = U.to(ct), Sc = S.to(ct), Vhc = Vh.to(ct);
  const at::Tensor cr = crow.to(at::kLong).contiguous(), cl = col.to(at::kLong).contiguous();
  const at::Tensor v = val.to(ct).contiguous();
  std::optional<SVD> res;
  AT_DISPATCH_FLOATING_TYPES(ct, "svd_append_sparse_cpu", [&] {
    res = s.dim == 1 ? append_sparse_columns<scalar_t>(Uc, Sc, Vhc, cr, cl, v, rank)
                   : append_sparse_columns<scalar_t>(Vhc.t(), Sc, Uc.t(), cr, cl, v, rank);
  });
  if (!res) return svdupd::svd_append_sparse_densified(U, S, Vh, crow, col, val, rank, dim);
  const SVD& r = *res;
  if (s.dim == 1) return svdupd::contiguous(r);
  return svdupd::contiguous({std::get<2>(r).t(), std::get<1>(r), std::get<0>(r).t()});
}

}  // namespace lowrank_ops

TORCH_LIBRARY_IMPL(lowrank_ops, CPU, m) {
  m.impl("svd_append", &lowrank_ops::svd_append_cpu);
  m.impl("svd_append_sparse", &lowrank_ops::svd_append_sparse_cpu);
}
