// CPU kernel of magnitude_threshold: the k-th largest |x| by selection
// (merge_common.h: sampled bracket + one streaming pass + nth_element), O(n).
#include <torch/library.h>

#include "merge/merge_common.h"

namespace lowrank_ops {

at::Tensor magnitude_threshold_cpu(const at::Tensor& x, double density) {
  constexpr const char* op = "magnitude_threshold";
  merge_detail::check_float(x, op, "x");
  merge_detail::check_density(density, op);
  auto xc = x.contiguous();
  const int64_t n = xc.numel();
  const int64_t k = merge_math::topk_count(density, n);
  at::Tensor out = at::empty({}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), op, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    acc_t v = std::numeric_limits<acc_t>::infinity();
    if (k > 0) {
      v = merge_math::MagKey<acc_t>::value(merge_detail::kth_largest_key<scalar_t, acc_t>(xc.data_ptr<scalar_t>(), n, k));
    }
    out.fill_(static_cast<double>(v));
  });
  return out;
}

}  // namespace lowrank_ops

TORCH_LIBRARY_IMPL(lowrank_ops, CPU, m) {
  m.impl("magnitude_threshold", &lowrank_ops::magnitude_threshold_cpu);
}
