// CPU kernel of dare_merge (DARE, Yu et al. 2024, Eq. 2-3): drop each delta with
// probability 1 - density by the counter hash of merge_math.h (no RNG state:
// identical on any thread count and on CUDA), rescale kept entries by
// 1/density, then a linear or TIES-consensus combination, in one pass.
#include <torch/library.h>

#include "merge/merge_common.h"

namespace lowrank_ops {

at::Tensor dare_merge_cpu(const at::Tensor& deltas, const at::Tensor& weights, double density, int64_t seed,
                          c10::string_view consensus, c10::string_view sign_method, bool normalize) {
  constexpr const char* op = "dare_merge";
  const std::string cons(consensus), method(sign_method);
  merge_detail::check_dare_args(deltas, weights, density, cons, method, op);
  auto d = deltas.contiguous();
  const int64_t N = d.size(0), P = d.size(1);
  at::Tensor out = at::empty({P}, d.options());
  if (P == 0) return out;
  const uint32_t T = merge_math::dare_keep_threshold(density);
  const int64_t nblocks = ((P - 1) >> 32) + 1;
  std::vector<uint32_t> bkeys(N * nblocks);
  for (int64_t i = 0; i < N; ++i)
    for (int64_t b = 0; b < nblocks; ++b)
      bkeys[i * nblocks + b] = merge_math::dare_block_key(static_cast<uint64_t>(seed), i, b);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, d.scalar_type(), op, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* dp = d.data_ptr<scalar_t>();
    const acc_t dens = static_cast<acc_t>(density);
    const uint32_t* bk = bkeys.data();
    const auto w = merge_detail::weights_vector<acc_t>(weights);
    scalar_t* op_ = out.data_ptr<scalar_t>();
    const bool ties = cons == "ties", count = method == "count";
    if (nblocks == 1) {
      // P <= 2^32: one key per model, the element index fits the 32-bit hash lane.
      auto value = [=](int64_t i, int64_t p) -> acc_t {
        const uint32_t h = merge_math::dare_hash(bk[i], static_cast<uint32_t>(p));
        return merge_detail::keep_or_zero<acc_t>((h >> 8) < T, static_cast<acc_t>(dp[i * P + p]) / dens);
      };
      merge_detail::combine_cpu<scalar_t, acc_t>(N, P, w, ties, count, normalize, op_, value);
    } else {
      auto value = [=](int64_t i, int64_t p) -> acc_t {
        const uint32_t h = merge_math::dare_hash(bk[i * nblocks + (p >> 32)], static_cast<uint32_t>(p));
        return merge_detail::keep_or_zero<acc_t>((h >> 8) < T, static_cast<acc_t>(dp[i * P + p]) / dens);
      };
      merge_detail::combine_cpu<scalar_t, acc_t>(N, P, w, ties, count, normalize, op_, value);
    }
  });
  return out;
}

}  // namespace lowrank_ops

TORCH_LIBRARY_IMPL(lowrank_ops, CPU, m) {
  m.impl("dare_merge", &lowrank_ops::dare_merge_cpu);
}
