// CPU kernel of sign_consensus: per coordinate, the TIES-elected sign of the
// contributing deltas and how many models contribute / agree with it -- the
// primitive of NegMerge (keep where all agree) and RAM (shared vs unique).
#include <torch/library.h>

#include "merge/merge_common.h"

namespace lowrank_ops {

std::tuple<at::Tensor, at::Tensor, at::Tensor> sign_consensus_cpu(const at::Tensor& deltas, const OptTensor& weights,
                                                                  double eps, c10::string_view sign_method) {
  constexpr const char* op = "sign_consensus";
  const std::string method(sign_method);
  const at::Tensor w_t = weights.has_value() ? *weights : at::Tensor();
  merge_detail::check_sign_consensus_args(deltas, weights, eps, method, op);
  auto d = deltas.contiguous();
  const int64_t N = d.size(0), P = d.size(1);
  at::Tensor sign, support, count;
  std::tie(sign, support, count) = merge_detail::sign_consensus_outputs(d);
  if (P == 0) return {sign, support, count};
  const bool count_method = method == "count";
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, d.scalar_type(), op, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* dp = d.data_ptr<scalar_t>();
    const std::vector<acc_t> w = w_t.defined() ? merge_detail::weights_vector<acc_t>(w_t) : std::vector<acc_t>(N, 1);
    const acc_t e = static_cast<acc_t>(eps);
    scalar_t* sp = sign.data_ptr<scalar_t>();
    int32_t* up = support.data_ptr<int32_t>();
    int32_t* cp = count.data_ptr<int32_t>();
    constexpr int64_t B = 512;
    at::parallel_for(0, (P + B - 1) / B, 16, [&](int64_t cb, int64_t ce) {
      acc_t S[B];
      int32_t C[B];
      for (int64_t c = cb; c < ce; ++c) {
        const int64_t p0 = c * B, len = std::min(B, P - p0);
        for (int64_t j = 0; j < len; ++j) S[j] = acc_t(0), C[j] = 0;
        for (int64_t i = 0; i < N; ++i) {
          for (int64_t j = 0; j < len; ++j) {
            const acc_t v = static_cast<acc_t>(dp[i * P + p0 + j]);
            const bool on = std::abs(v) > e;
            const acc_t s = w[i] * v;
            const acc_t t = count_method ? static_cast<acc_t>(s > acc_t(0)) - static_cast<acc_t>(s < acc_t(0)) : s;
            S[j] += merge_detail::keep_or_zero<acc_t>(on, t);
            C[j] += static_cast<int32_t>(on);
          }
        }
        for (int64_t j = 0; j < len; ++j) {
          sp[p0 + j] = static_cast<scalar_t>(S[j] >= acc_t(0) ? 1 : -1);
          cp[p0 + j] = C[j];
          up[p0 + j] = 0;
        }
        for (int64_t i = 0; i < N; ++i) {
          for (int64_t j = 0; j < len; ++j) {
            const acc_t v = static_cast<acc_t>(dp[i * P + p0 + j]);
            const acc_t s = w[i] * v;
            const bool on = std::abs(v) > e;
            const acc_t e_j = S[j] >= acc_t(0) ? acc_t(1) : acc_t(-1);
            up[p0 + j] += static_cast<int32_t>(on & (s * e_j > acc_t(0)));
          }
        }
      }
    });
  });
  return {sign, support, count};
}

}  // namespace lowrank_ops

TORCH_LIBRARY_IMPL(lowrank_ops, CPU, m) {
  m.impl("sign_consensus", &lowrank_ops::sign_consensus_cpu);
}
