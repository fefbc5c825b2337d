// Device-generic pieces of the lowrank family shared by the CPU (.cpp) and
// CUDA (.cu) kernels: argument checks and the GEMM schedule.  Dense products go
// through ATen (BLAS on CPU, cuBLAS on CUDA); each backend supplies only the
// elementwise epilogues, which it fuses its own way.
#pragma once

#include "common.h"

#include <ATen/core/Tensor.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/linalg_vector_norm.h>
#include <ATen/ops/nonzero.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros.h>
#include <c10/util/accumulate.h>

#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "ops.h"

namespace lowrank_ops {
namespace detail {

using lowrank_ops::shape_str;

inline void check_same(const at::Tensor& ref, const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": `", name, "` has dtype ", t.scalar_type(),
              " but `x` has dtype ", ref.scalar_type(), "; all tensors must share one dtype");
  TORCH_CHECK(t.device() == ref.device(), op, ": `", name, "` is on ", t.device(), " but `x` is on ",
              ref.device(), "; all tensors must be on one device");
}

inline void check_float(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": `", name,
              "` must be a floating tensor (float64/float32/bfloat16/float16), got ", t.scalar_type());
}

// Shapes of one lowrank_linear call, validated once for forward and backward.
struct LinearShapes {
  int64_t in, out, rd, ru, tokens;
  bool core_diag;
};

inline LinearShapes check_lowrank_linear(const at::Tensor& x, const OptTensor& weight, const OptTensor& bias,
                                         const at::Tensor& down, const at::Tensor& up, const OptTensor& core,
                                         const OptTensor& out_scale, const char* op) {
  check_float(x, op, "x");
  TORCH_CHECK(x.dim() >= 1, op, ": `x` must have shape (..., in), got a 0-d tensor");
  TORCH_CHECK(down.dim() == 2, op, ": `down` must have shape (r, in), got ", shape_str(down));
  TORCH_CHECK(up.dim() == 2, op, ": `up` must have shape (out, r), got ", shape_str(up));
  LinearShapes s{};
  s.in = x.size(-1);
  s.rd = down.size(0);
  s.ru = up.size(1);
  s.out = up.size(0);
  s.tokens = c10::multiply_integers(x.sizes().begin(), x.sizes().end() - 1);  // also right when in == 0
  TORCH_CHECK(s.rd > 0 && s.ru > 0, op, ": rank must be >= 1, got `down` ", shape_str(down), " and `up` ",
              shape_str(up));
  TORCH_CHECK(down.size(1) == s.in, op, ": `down` must have shape (r, in) = (r, ", s.in, ") to match `x` ",
              shape_str(x), ", got ", shape_str(down));
  check_same(x, down, op, "down");
  check_same(x, up, op, "up");
  if (weight.has_value()) {
    const auto& w = *weight;
    check_same(x, w, op, "weight");
    TORCH_CHECK(w.dim() == 2 && w.size(0) == s.out && w.size(1) == s.in, op,
                ": `weight` must have shape (out, in) = (", s.out, ", ", s.in, ") given `up` ", shape_str(up),
                " and `x` ", shape_str(x), ", got ", shape_str(w));
  }
  s.core_diag = false;
  if (core.has_value()) {
    const auto& c = *core;
    check_same(x, c, op, "core");
    if (c.dim() == 1) {
      TORCH_CHECK(s.rd == s.ru && c.size(0) == s.rd, op, ": a diagonal `core` must have shape (r,) = (", s.rd,
                  ",) with r shared by `down` ", shape_str(down), " and `up` ", shape_str(up), ", got ",
                  shape_str(c));
      s.core_diag = true;
    } else {
      TORCH_CHECK(c.dim() == 2 && c.size(0) == s.ru && c.size(1) == s.rd, op,
                  ": `core` must have shape (r,) or (r_up, r_down) = (", s.ru, ", ", s.rd, "), got ",
                  shape_str(c));
    }
  } else {
    TORCH_CHECK(s.rd == s.ru, op, ": without `core`, `down` ", shape_str(down), " and `up` ", shape_str(up),
                " must share the rank r");
  }
  if (bias.has_value()) {
    check_same(x, *bias, op, "bias");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == s.out, op, ": `bias` must have shape (out,) = (", s.out,
                ",), got ", shape_str(*bias));
  }
  if (out_scale.has_value()) {
    check_same(x, *out_scale, op, "out_scale");
    TORCH_CHECK(out_scale->dim() == 1 && out_scale->size(0) == s.out, op,
                ": `out_scale` must have shape (out,) = (", s.out, ",), got ", shape_str(*out_scale));
  }
  return s;
}

inline std::vector<int64_t> out_sizes(const at::Tensor& x, int64_t out) {
  std::vector<int64_t> sz(x.sizes().begin(), x.sizes().end());
  sz.back() = out;
  return sz;
}

inline at::Tensor as_rows(const at::Tensor& x, int64_t tokens, int64_t in) {
  // A view whenever the layout allows; BLAS takes any 2-D stride with one unit dim.
  return x.reshape({tokens, in});
}

// The core applied to h (T, r_d): hc = h·coreᵀ (or h ⊙ core), h itself without a
// core; a diagonal core scales h in place when `overwrite` allows.
inline at::Tensor apply_core(const at::Tensor& h, const OptTensor& core, bool diag, bool overwrite) {
  if (!core.has_value()) return h;
  if (diag) return overwrite ? h.mul_(*core) : h.mul(*core);
  return at::mm(h, core->t());
}

// h = x·downᵀ, then the core: hc = h·coreᵀ (or h ⊙ core).  Both (T, r): small.
inline at::Tensor rank_r_term(const at::Tensor& x2, const at::Tensor& down, const OptTensor& core, bool diag,
                              at::Tensor* h_out) {
  at::Tensor h = at::mm(x2, down.t());
  if (h_out) *h_out = h;
  return apply_core(h, core, diag, /*overwrite=*/h_out == nullptr);
}

// BLAS skips reading c and d when alpha = 0, which would mask a NaN or Inf in the
// rank-r factors (docs/ops.md: NaN/Inf propagate as IEEE arithmetic does, and the
// reference's 0·(c·d) is NaN there).  For scale = 0 the small (T, r) factor is
// multiplied by 0 instead (0·NaN = 0·Inf = NaN) and the GEMM runs with alpha = 1.
inline std::pair<at::Tensor, double> rank_r_factor(const at::Tensor& c, double scale) {
  if (scale != 0.0) return {c, scale};
  return {c.mul(0.0), 1.0};
}

// dst = a·b + s·c·d: the rank-r term c·d written first (beta = 0, plus `bias`
// when given), then the base GEMM a·b accumulates onto it with beta = 1 — free
// for the GEMM, which reads and writes its output once per K block anyway —
// instead of a separate read-modify-write pass of the rank-r term over dst
// afterwards.  The mirrored few-row GEMM (common.h) cannot accumulate, so there
// the rank-r term comes second.
inline void base_plus_rank_r_into(at::Tensor& dst, const at::Tensor& a, const at::Tensor& b, const at::Tensor& c_in,
                                  const at::Tensor& d, double scale_in, const OptTensor& bias = OptTensor{}) {
  const auto [c, scale] = rank_r_factor(c_in, scale_in);
  if (mirror_few_rows_gemm(a.size(0), b)) {
    few_rows_mm_out(dst, a, b, bias);
    dst.addmm_(c, d, /*beta=*/1, /*alpha=*/scale);
    return;
  }
  if (bias.has_value()) {
    at::addmm_out(dst, *bias, c, d, /*beta=*/1, /*alpha=*/scale);
  } else {
    at::addmm_out(dst, dst, c, d, /*beta=*/0, /*alpha=*/scale);
  }
  dst.addmm_(a, b);
}

// z = x·Wᵀ + s·hc·upᵀ written into `y`; bias folded in when allowed.
inline void base_plus_lowrank_into(at::Tensor& y, const at::Tensor& x2, const OptTensor& weight,
                                   const OptTensor& bias_in_gemm, const at::Tensor& hc, const at::Tensor& up,
                                   double scale) {
  if (weight.has_value()) {
    base_plus_rank_r_into(y, x2, weight->t(), hc, up.t(), scale, bias_in_gemm);
  } else {
    const auto [c, alpha] = rank_r_factor(hc, scale);
    at::addmm_out(y, y, c, up.t(), /*beta=*/0, alpha);
    if (bias_in_gemm.has_value()) y.add_(*bias_in_gemm);
  }
}

// Epilogue y = y ⊙ out_scale + bias over rows (out_scale, bias optional, (out,)).
using RowEpilogue = void (*)(at::Tensor& y, const OptTensor& out_scale, const OptTensor& bias);

// With `h_out` given (lowrank_linear_with_h) the rank-r intermediate h = x·downᵀ
// is returned there as (..., r_d), for the backward to reuse instead of recomputing.
inline at::Tensor lowrank_linear_impl(const at::Tensor& x, const OptTensor& weight, const OptTensor& bias,
                                      const at::Tensor& down, const at::Tensor& up, const OptTensor& core,
                                      double scale, const OptTensor& out_scale, RowEpilogue epilogue,
                                      at::Tensor* h_out = nullptr) {
  const auto s = check_lowrank_linear(x, weight, bias, down, up, core, out_scale,
                                      h_out ? "lowrank_linear_with_h" : "lowrank_linear");
  at::Tensor y = at::empty({s.tokens, s.out}, x.options());
  if (s.tokens == 0 || s.in == 0) {
    if (h_out) *h_out = at::zeros(out_sizes(x, s.rd), x.options());
    if (s.tokens == 0) return y.view(out_sizes(x, s.out));
    y.zero_();
    epilogue(y, out_scale, bias);
    return y.view(out_sizes(x, s.out));
  }
  const at::Tensor x2 = as_rows(x, s.tokens, s.in);
  at::Tensor h;
  const at::Tensor hc = rank_r_term(x2, down, core, s.core_diag, h_out ? &h : nullptr);
  if (h_out) *h_out = h.view(out_sizes(x, s.rd));
  // With out_scale the bias must come after the scaling, so it joins the epilogue.
  const bool bias_in_gemm = bias.has_value() && !out_scale.has_value();
  base_plus_lowrank_into(y, x2, weight, bias_in_gemm ? bias : OptTensor{}, hc, up, scale);
  if (out_scale.has_value()) epilogue(y, out_scale, bias);
  return y.view(out_sizes(x, s.out));
}

// Reduces an (T, out) elementwise product over rows: Σ_t a ⊙ b  -> (out).
using ColumnDot = at::Tensor (*)(const at::Tensor& a, const at::Tensor& b);

// `h_saved`: the forward's h = x·downᵀ (lowrank_linear_with_h), (..., r_d); recomputed when absent.
inline Grads7 lowrank_linear_backward_impl(const at::Tensor& grad, const at::Tensor& x, const OptTensor& weight,
                                           const at::Tensor& down, const at::Tensor& up, const OptTensor& core,
                                           double scale, const OptTensor& out_scale,
                                           std::array<bool, 7> mask, ColumnDot column_dot,
                                           const OptTensor& h_saved = OptTensor{}) {
  const char* op = "lowrank_linear_backward";
  const auto s = check_lowrank_linear(x, weight, OptTensor{}, down, up, core, out_scale, op);
  check_same(x, grad, op, "grad");
  TORCH_CHECK(grad.sizes() == at::IntArrayRef(out_sizes(x, s.out)), op, ": `grad` must have shape ",
              shape_str(out_sizes(x, s.out)),
              " (`x`'s leading dims, then out), got ", shape_str(grad));
  const bool need_x = mask[0], need_w = mask[1] && weight.has_value(), need_b = mask[2], need_down = mask[3],
             need_up = mask[4], need_core = mask[5] && core.has_value(), need_os = mask[6] && out_scale.has_value();
  at::Tensor gx, gw, gb, gdown, gup, gcore, gos;
  const at::Tensor g2 = grad.reshape({s.tokens, s.out});
  const at::Tensor x2 = as_rows(x, s.tokens, s.in);
  if (need_b) gb = g2.sum(0);
  // gz = dL/dz, z the pre-scale output.
  const at::Tensor gz = out_scale.has_value() ? g2.mul(*out_scale) : g2;
  at::Tensor h;
  const bool need_h = need_x || need_down || need_up || need_core || need_os;
  at::Tensor hc;
  if (h_saved.has_value()) {
    check_same(x, *h_saved, op, "h");
    TORCH_CHECK(h_saved->numel() == s.tokens * s.rd && h_saved->size(-1) == s.rd, op,
                ": `h` must have shape (..., r) = (..., ", s.rd, ") with `x`'s leading dims ", shape_str(x),
                ", got ", shape_str(*h_saved));
  }
  if (need_h && h_saved.has_value()) {
    h = h_saved->reshape({s.tokens, s.rd});
    hc = apply_core(h, core, s.core_diag, /*overwrite=*/false);
  } else if (need_h) {
    hc = rank_r_term(x2, down, core, s.core_diag, &h);
  }
  if (need_os) {
    // z is not saved by forward (it would cost a (T, out) buffer per layer);
    // recomputing it costs one base GEMM and only happens when out_scale trains.
    at::Tensor z = at::empty({s.tokens, s.out}, x.options());
    base_plus_lowrank_into(z, x2, weight, OptTensor{}, hc, up, scale);
    gos = column_dot(g2, z);
  }
  if (need_up) gup = at::mm(gz.t(), hc).mul_(scale);
  if (need_x || need_down || need_core) {
    at::Tensor ghc = at::mm(gz, up).mul_(scale);  // dL/d(hc), (T, r_u)
    if (need_core) gcore = s.core_diag ? ghc.mul(h).sum(0) : at::mm(ghc.t(), h);
    at::Tensor gh = ghc;  // dL/dh, (T, r_d)
    if (core.has_value()) gh = s.core_diag ? ghc.mul_(*core) : at::mm(ghc, *core);
    if (need_down) gdown = at::mm(gh.t(), x2);
    if (need_x) {
      if (weight.has_value()) {
        gx = at::empty({s.tokens, s.in}, x.options());
        base_plus_rank_r_into(gx, gz, *weight, gh, down, 1.0);
      } else {
        gx = at::mm(gh, down);
      }
      gx = gx.view(x.sizes());
    }
  }
  if (need_w) gw = at::mm(gz.t(), x2);
  auto opt = x.options();
  auto or_empty = [&](at::Tensor t) { return t.defined() ? t : at::empty({0}, opt); };
  return {or_empty(gx), or_empty(gw), or_empty(gb), or_empty(gdown), or_empty(gup), or_empty(gcore), or_empty(gos)};
}

// ---- dora_norm ----------------------------------------------------------------

inline void check_dora(const at::Tensor& weight, const at::Tensor& down, const at::Tensor& up, const char* op) {
  check_float(weight, op, "weight");
  TORCH_CHECK(weight.dim() == 2, op, ": `weight` must have shape (out, in), got ", shape_str(weight));
  TORCH_CHECK(down.dim() == 2 && down.size(1) == weight.size(1) && down.size(0) > 0, op,
              ": `down` must have shape (r, in) = (r, ", weight.size(1), ") with r >= 1, got ", shape_str(down));
  TORCH_CHECK(up.dim() == 2 && up.size(0) == weight.size(0) && up.size(1) == down.size(0), op,
              ": `up` must have shape (out, r) = (", weight.size(0), ", ", down.size(0), "), got ", shape_str(up));
  auto same = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.scalar_type() == weight.scalar_type() && t.device() == weight.device(), op, ": `", name,
                "` must match `weight` (", weight.scalar_type(), " on ", weight.device(), "), got ",
                t.scalar_type(), " on ", t.device());
  };
  same(down, "down");
  same(up, "up");
}

// Pieces of the factored identity, in the accumulation dtype (fp32 for low
// precision, else the input dtype):  WD = W·downᵀ (out, r), UDD = up·(down·downᵀ) (out, r).
struct DoraFactors {
  at::Tensor wd, udd, u;
};

// From a W·downᵀ already computed in the weight's dtype (BLAS accumulates low
// precision in fp32), so W is read once and never upcast as a whole.
inline DoraFactors dora_factors_from(const at::Tensor& wd, const at::Tensor& down, const at::Tensor& up) {
  const auto acc = at::toOpMathType(up.scalar_type());
  at::Tensor d = down.to(acc);
  at::Tensor u = up.to(acc);
  return {wd.to(acc), at::mm(u, at::mm(d, d.t())), u};
}

inline DoraFactors dora_factors(const at::Tensor& weight, const at::Tensor& down, const at::Tensor& up) {
  return dora_factors_from(at::mm(weight, down.t()), down, up);
}

// n² = ‖W‖² + 2s·rowsum(WD ⊙ up) + s²·rowsum(UDD ⊙ up); the (out, r) products are tiny.
inline at::Tensor factored_norm_sq(const at::Tensor& wn2, const DoraFactors& f, double scale) {
  return wn2.add(f.wd.mul(f.u).sum(1), 2.0 * scale).add_(f.udd.mul(f.u).sum(1), scale * scale);
}

// rowsum(W ⊙ W) in the accumulation dtype, from the caller's cache when given.
inline at::Tensor weight_row_sq(const at::Tensor& weight, const OptTensor& weight_norm_sq, const char* op) {
  const auto acc = at::toOpMathType(weight.scalar_type());
  if (weight_norm_sq.has_value()) {
    const auto& c = *weight_norm_sq;
    TORCH_CHECK(c.dim() == 1 && c.size(0) == weight.size(0) && c.device() == weight.device(), op,
                ": `weight_norm_sq` must have shape (out,) = (", weight.size(0), ",) on ", weight.device(), ", got ",
                shape_str(c), " on ", c.device());
    check_float(c, op, "weight_norm_sq");
    return c.to(acc, /*non_blocking=*/false, /*copy=*/true);  // never write into the caller's cache
  }
  // One streaming reduction over W (no W-sized temporary), accumulated in `acc`.
  return at::linalg_vector_norm(weight, 2, {1}, false, acc).square_();
}

// The factored identity subtracts terms of size ‖W_j‖² when the adapter nearly
// cancels row j, so its error grows like ε·‖W_j‖²/n_j² where the dense
// formula's grows like ε·‖W_j‖/n_j.  Rows with n_j² < ‖W_j‖²/4 (error
// amplified by more than 2x) are recomputed densely from W_j + s·up_j·down in
// the accumulation dtype: O(k·in·r) for k such rows, none in ordinary training.
// So are rows whose factored n² is not finite (an Inf in W_j gives Inf − Inf =
// NaN there; the dense row gives the Inf the unfactored formula does).
// `cached`: wn2 is the caller's `weight_norm_sq`, which the op's definition
// takes as given (n² = wn2 + cross terms, differentiable in it).  A recomputed row
// then keeps that definition: ‖V_j‖² + (wn2_j − ‖W_j‖²), the correction
// applied only when it exceeds the rounding of ‖W_j‖² (a cache that equals
// ‖W_j‖² up to rounding would otherwise bring back the cancellation error).
inline at::Tensor finish_row_norms(at::Tensor n2, const at::Tensor& wn2, const at::Tensor& weight,
                                   const at::Tensor& down, const at::Tensor& up, double scale, bool cached) {
  const at::Tensor bad = n2.lt(wn2.mul(0.25)).logical_or_(n2.isfinite().logical_not_()).nonzero().squeeze(1);
  if (bad.numel() > 0) {
    const auto acc = n2.scalar_type();
    const at::Tensor w = weight.index_select(0, bad).to(acc);
    at::Tensor v = w.addmm(up.index_select(0, bad).to(acc), down.to(acc), /*beta=*/1, /*alpha=*/scale);
    at::Tensor vn2 = v.mul(v).sum(1);
    if (cached) {
      const at::Tensor w_true = w.mul(w).sum(1);
      const at::Tensor diff = wn2.index_select(0, bad).to(acc).sub(w_true);
      const double u = acc == at::kDouble ? std::numeric_limits<double>::epsilon()
                                          : static_cast<double>(std::numeric_limits<float>::epsilon());
      const double slack = 8.0 * u * static_cast<double>(std::max<int64_t>(weight.size(1), 1));
      vn2.add_(at::where(diff.abs().gt(w_true.mul(slack)), diff, at::zeros({}, diff.options())));
    }
    n2.index_copy_(0, bad, vn2);
  }
  // Rounding can push an exactly-zero row norm slightly negative.
  return n2.clamp_min_(0).sqrt_();
}

inline at::Tensor dora_norm_impl(const at::Tensor& weight, const at::Tensor& down, const at::Tensor& up, double scale,
                                 const OptTensor& weight_norm_sq) {
  const char* op = "dora_norm";
  check_dora(weight, down, up, op);
  at::Tensor wn2 = weight_row_sq(weight, weight_norm_sq, op);
  if (weight.size(0) == 0) return at::empty({0}, weight.options());
  at::Tensor n2 = factored_norm_sq(wn2, dora_factors(weight, down, up), scale);
  return finish_row_norms(n2, wn2, weight, down, up, scale, weight_norm_sq.has_value()).to(weight.scalar_type());
}

inline Grads3 dora_norm_backward_impl(const at::Tensor& grad, const at::Tensor& norm, const at::Tensor& weight,
                                      const at::Tensor& down, const at::Tensor& up, double scale,
                                      std::array<bool, 3> mask) {
  const char* op = "dora_norm_backward";
  check_dora(weight, down, up, op);
  TORCH_CHECK(grad.dim() == 1 && grad.size(0) == weight.size(0) && norm.sizes() == grad.sizes(), op,
              ": `grad` and `norm` must have shape (out,) = (", weight.size(0), ",), got ", shape_str(grad), " and ",
              shape_str(norm));
  const auto acc = at::toOpMathType(weight.scalar_type());
  // dn_j/dV_j = V_j / n_j with V = W + s·up·down; at n_j = 0 we take the zero subgradient.
  at::Tensor n = norm.to(acc);
  at::Tensor c = at::where(n.gt(0), grad.to(acc).div(n), at::zeros({}, n.options()));
  at::Tensor gw, gd, gu;
  const auto wdt = weight.scalar_type();
  if (mask[0]) {
    // dense by nature: the gradient of a dense W
    at::Tensor cu = up.to(acc).mul(c.unsqueeze(1)).to(wdt);
    gw = at::addmm(weight.mul(c.to(wdt).unsqueeze(1)), cu, down, 1, scale);
  }
  if (mask[1] || mask[2]) {
    // Rows where the adapter nearly cancels W (n_j² < ‖W_j‖²/4, as in the
    // forward) lose precision in the factored formulas, which subtract terms
    // of size ‖W_j‖; their V_j = W_j + s·up_j·down is formed densely instead.
    const at::Tensor wn2 = at::linalg_vector_norm(weight, 2, {1}, false, acc).square_();
    const at::Tensor bad = n.square().lt(wn2.mul(0.25)).nonzero().squeeze(1);
    const bool any_bad = bad.numel() > 0;
    const at::Tensor ua = up.to(acc), da = down.to(acc);
    at::Tensor c_good = c, v_bad, c_bad;
    if (any_bad) {
      c_good = c.index_fill(0, bad, 0);
      c_bad = c.index_select(0, bad);
      v_bad = weight.index_select(0, bad).to(acc).addmm_(ua.index_select(0, bad), da, 1, scale);  // (k, in)
    }
    if (mask[1]) {
      // ∂down = s·Σ_j c_j·up_jᵀ·V_j = s·((c⊙up)ᵀ·W + s·((c⊙up)ᵀ·up)·down)
      at::Tensor cu = ua.mul(c_good.unsqueeze(1));                         // (out, r)
      at::Tensor g = at::mm(cu.to(wdt).t(), weight).to(acc);               // (r, in): one pass over W
      g.addmm_(at::mm(cu.t(), ua), da, 1, scale);
      if (any_bad) g.addmm_(ua.index_select(0, bad).mul(c_bad.unsqueeze(1)).t(), v_bad);
      gd = g.mul_(scale).to(wdt);
    }
    if (mask[2]) {
      // ∂up = s·c ⊙ (V·downᵀ) = s·c ⊙ (W·downᵀ + s·up·(down·downᵀ))
      auto f = dora_factors(weight, down, up);
      at::Tensor vd = f.wd.add_(f.udd, scale);
      if (any_bad) vd.index_copy_(0, bad, at::mm(v_bad, da.t()));
      gu = vd.mul_(c.unsqueeze(1)).mul_(scale).to(wdt);
    }
  }
  auto opt = weight.options();
  auto or_empty = [&](at::Tensor t) { return t.defined() ? t : at::empty({0}, opt); };
  return {or_empty(gw), or_empty(gd), or_empty(gu)};
}

// ---- dora_linear ----------------------------------------------------------------

// dst = src ⊙ out_scale + bias row-wise; dst may alias src.
using RowEpilogueInto = void (*)(at::Tensor& dst, const at::Tensor& src, const OptTensor& out_scale,
                                 const OptTensor& bias);
using Tensors4 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using Grads6 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

inline void check_magnitude(const at::Tensor& x, const at::Tensor& magnitude, int64_t out, const char* op) {
  check_same(x, magnitude, op, "magnitude");
  TORCH_CHECK(magnitude.dim() == 1 && magnitude.size(0) == out, op, ": `magnitude` must have shape (out,) = (", out,
              ",), got ", shape_str(magnitude));
}

// DoRA's forward with one pass over W: the base GEMM runs on the stacked rows
// [x; down], so the same product yields x·Wᵀ and down·Wᵀ = (W·downᵀ)ᵀ, the
// only W-sized term of the factored row norm (when T >= r; below that the
// products run separately, see the branch).  Returns (y, z, n, h): the output,
// the pre-scale output z = x·Wᵀ + s·x·downᵀ·upᵀ (the magnitude's gradient
// needs it), the row norms n = ‖W + s·up·down‖ and the rank-r intermediate
// h = x·downᵀ (..., r), which the backward reuses.
inline Tensors4 dora_linear_impl(const at::Tensor& x, const at::Tensor& weight, const OptTensor& bias,
                                 const at::Tensor& down, const at::Tensor& up, const at::Tensor& magnitude,
                                 double scale, const OptTensor& weight_norm_sq, RowEpilogueInto epilogue) {
  const char* op = "dora_linear";
  const auto s = check_lowrank_linear(x, weight, bias, down, up, OptTensor{}, OptTensor{}, op);
  check_magnitude(x, magnitude, s.out, op);
  const auto acc = at::toOpMathType(weight.scalar_type());
  at::Tensor wn2 = weight_row_sq(weight, weight_norm_sq, op);
  const int64_t T = s.tokens, r = s.rd;
  const at::Tensor x2 = as_rows(x, T, s.in);
  at::Tensor z, dw;  // z = x·Wᵀ + s·x·downᵀ·upᵀ (T, out), dw = down·Wᵀ (r, out)
  at::Tensor h;      // x·downᵀ (T, r)
  const bool lowrank = T > 0 && s.in > 0;
  if (T >= r || mirror_few_rows_gemm(T + r, weight.t())) {
    // Stacking adds at most T rows to a GEMM that reads W anyway: one pass over W.
    // (With the mirrored few-rows GEMM, see common.h, even r extra rows on a
    // handful of tokens cost less than a second pass.)
    at::Tensor xa = at::empty({T + r, s.in}, x.options());
    xa.narrow(0, 0, T).copy_(x2);
    xa.narrow(0, T, r).copy_(down);
    at::Tensor za = at::empty({T + r, s.out}, x.options());
    if (lowrank) {
      // h = x·downᵀ over the first T rows and zero over the r stacked `down` rows,
      // so the rank-r term reaches z only.
      at::Tensor ha = at::empty({T + r, r}, x.options());
      h = ha.narrow(0, 0, T);
      at::mm_out(h, x2, down.t());
      ha.narrow(0, T, r).zero_();
      base_plus_rank_r_into(za, xa, weight.t(), ha, up.t(), scale);
    } else if (s.in == 0) {
      za.zero_();
    } else {
      few_rows_mm_out(za, xa, weight.t());
    }
    z = za.narrow(0, 0, T);
    dw = za.narrow(0, T, r);
  } else {
    // Few tokens (decoding): more than doubling the GEMM's rows would move it
    // off the matrix-vector path, so the two products run separately.
    z = at::empty({T, s.out}, x.options());
    if (lowrank) {
      h = at::mm(x2, down.t());
      base_plus_rank_r_into(z, x2, weight.t(), h, up.t(), scale);
    } else {
      z.zero_();
    }
    dw = at::mm(down, weight.t());
  }
  at::Tensor n2 = factored_norm_sq(wn2, dora_factors_from(dw.t(), down, up), scale);
  at::Tensor n = finish_row_norms(n2, wn2, weight, down, up, scale, weight_norm_sq.has_value());
  // A zero row norm gives an infinite factor, as the unfactored formula does.
  const at::Tensor factor = magnitude.to(acc).div(n).to(x.scalar_type());
  at::Tensor y = at::empty({T, s.out}, x.options());
  if (T > 0) epilogue(y, z, factor, bias);
  if (!h.defined()) h = at::zeros({T, r}, x.options());  // no tokens or no input features
  return {y.view(out_sizes(x, s.out)), z.view(out_sizes(x, s.out)), n.to(weight.scalar_type()),
          h.view(out_sizes(x, r))};
}

// Gradients of dora_linear's first output with the norm held constant (DoRA §4.3):
// gz = g ⊙ m/n feeds lowrank_linear's backward; dL/dm = Σ_t g ⊙ z / n.
inline Grads6 dora_linear_backward_impl(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight,
                                        const at::Tensor& down, const at::Tensor& up, const at::Tensor& magnitude,
                                        double scale, const at::Tensor& pre_scale, const at::Tensor& norm,
                                        std::array<bool, 6> mask, ColumnDot column_dot,
                                        const OptTensor& h = OptTensor{}) {
  const char* op = "dora_linear_backward";
  const auto s = check_lowrank_linear(x, weight, OptTensor{}, down, up, OptTensor{}, OptTensor{}, op);
  check_magnitude(x, magnitude, s.out, op);
  TORCH_CHECK(pre_scale.sizes() == grad.sizes() && norm.dim() == 1 && norm.size(0) == s.out, op,
              ": `pre_scale` must match `grad` ", shape_str(grad), " and `norm` be (", s.out, ",); got ",
              shape_str(pre_scale), " and ", shape_str(norm));
  check_same(x, pre_scale, op, "pre_scale");
  TORCH_CHECK(norm.device() == x.device() && at::isFloatingType(norm.scalar_type()), op,
              ": `norm` must be a floating tensor on ", x.device(), ", got ", norm.scalar_type(), " on ",
              norm.device());
  const auto acc = at::toOpMathType(weight.scalar_type());
  const at::Tensor n = norm.to(acc);
  const at::Tensor factor = magnitude.to(acc).div(n).to(x.scalar_type());
  auto g = lowrank_linear_backward_impl(grad, x, weight, down, up, OptTensor{}, scale, factor,
                                        {mask[0], mask[1], mask[2], mask[3], mask[4], false, false}, column_dot, h);
  at::Tensor gm;
  if (mask[5]) {
    gm = column_dot(grad.reshape({s.tokens, s.out}), pre_scale.reshape({s.tokens, s.out})).to(acc).div_(n)
             .to(x.scalar_type());
  } else {
    gm = at::empty({0}, x.options());
  }
  return {std::get<0>(g), std::get<1>(g), std::get<2>(g), std::get<3>(g), std::get<4>(g), gm};
}

}  // namespace detail
}  // namespace lowrank_ops
