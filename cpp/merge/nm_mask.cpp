// CPU kernel of nm_mask: keep the n largest |x| of every m consecutive entries
// along the last dim, never a `forbidden` position (CABS, Yang et al. 2025,
// "balanced sparsification" with the conflict-aware forbidden set).
#include <torch/library.h>

#include "merge/merge_common.h"

namespace lowrank_ops {

at::Tensor nm_mask_cpu(const at::Tensor& x, int64_t n, int64_t m, const OptTensor& forbidden) {
  constexpr const char* op = "nm_mask";
  merge_detail::check_nm_mask_args(x, n, m, forbidden, op);
  auto xc = x.contiguous();
  at::Tensor fb = forbidden.has_value() ? forbidden->contiguous() : at::Tensor();
  at::Tensor out = at::empty(x.sizes(), x.options().dtype(at::kBool));
  const int64_t G = xc.numel() / m;
  bool* op_ = out.data_ptr<bool>();
  const bool* fp = fb.defined() ? fb.data_ptr<bool>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), op, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    using K = merge_math::MagKey<acc_t>;
    using U = typename K::U;
    const scalar_t* xp = xc.data_ptr<scalar_t>();
    at::parallel_for(0, G, std::max<int64_t>(1, 4096 / m), [&](int64_t gb, int64_t ge) {
      for (int64_t g = gb; g < ge; ++g) {
        const int64_t base = g * m;
        for (int64_t j = 0; j < m; ++j) op_[base + j] = false;
        // n rounds of "largest remaining"; strict > keeps the lowest index among equals.
        for (int64_t r = 0; r < n; ++r) {
          int64_t best = -1;
          U bk = 0;
          for (int64_t j = 0; j < m; ++j) {
            if (op_[base + j] || (fp && fp[base + j])) continue;
            U u = K::of(static_cast<acc_t>(xp[base + j]));
            if (u == K::kNaN) u = K::kInf;  // NaN ranks as +inf
            if (best < 0 || u > bk) {
              best = j;
              bk = u;
            }
          }
          if (best < 0) break;
          op_[base + best] = true;
        }
      }
    });
  });
  return out;
}

}  // namespace lowrank_ops

TORCH_LIBRARY_IMPL(lowrank_ops, CPU, m) {
  m.impl("nm_mask", &lowrank_ops::nm_mask_cpu);
}
