// CPU kernel of ties_merge (TIES-Merging, Yadav et al. 2023, Alg. 1): N
// per-model thresholds by selection, then trim + elect + disjoint mean fused
// in one chunked pass over the (N, P) deltas (merge_common.h, combine_cpu).
#include <torch/library.h>

#include "merge/merge_common.h"

namespace lowrank_ops {

at::Tensor ties_merge_cpu(const at::Tensor& deltas, const at::Tensor& weights, double density,
                          c10::string_view sign_method, bool normalize) {
  constexpr const char* op = "ties_merge";
  const std::string method(sign_method);
  merge_detail::check_ties_args(deltas, weights, density, method, op);
  auto d = deltas.contiguous();
  const int64_t N = d.size(0), P = d.size(1);
  at::Tensor out = at::empty({P}, d.options());
  if (P == 0) return out;
  const int64_t k = merge_math::topk_count(density, P);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, d.scalar_type(), op, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    using K = merge_math::MagKey<acc_t>;
    using U = typename K::U;
    const scalar_t* dp = d.data_ptr<scalar_t>();
    std::vector<U> thr(N);
    merge_detail::keep_keys<scalar_t, acc_t>(dp, N, P, k, thr.data());
    const auto w = merge_detail::weights_vector<acc_t>(weights);
    const U* tp = thr.data();
    auto value = [dp, P, tp](int64_t i, int64_t p) -> acc_t {
      const acc_t v = static_cast<acc_t>(dp[i * P + p]);
      return merge_detail::keep_or_zero<acc_t>(K::of(v) >= tp[i], v);
    };
    merge_detail::combine_cpu<scalar_t, acc_t>(N, P, w, /*consensus=*/true, method == "count", normalize,
                                               out.data_ptr<scalar_t>(), value);
  });
  return out;
}

}  // namespace lowrank_ops

TORCH_LIBRARY_IMPL(lowrank_ops, CPU, m) {
  m.impl("ties_merge", &lowrank_ops::ties_merge_cpu);
}
