// Shared pieces of the merge family: argument checks (CPU and CUDA) and the
// CPU building blocks -- O(n) k-th-largest-magnitude selection and the fused
// per-coordinate consensus loop that TIES and DARE-TIES share.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cstring>
#include <cmath>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include "merge/merge_math.h"
#include "ops.h"

namespace lowrank_ops {
namespace merge_detail {

inline std::string shape_str(const at::Tensor& t) {
  std::string s = "(";
  for (int64_t i = 0; i < t.dim(); ++i) {
    if (i) s += ", ";
    s += std::to_string(t.size(i));
  }
  return s + ")";
}

inline void check_float(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": `", name,
              "` must be float64/float32/bfloat16/float16, got ", t.scalar_type());
}

inline void check_density(double density, const char* op) {
  TORCH_CHECK(density >= 0.0 && density <= 1.0, op, ": `density` must be in [0, 1], got ", density);
}

inline void check_sign_method(const std::string& sign_method, const char* op) {
  TORCH_CHECK(sign_method == "sum" || sign_method == "count", op, ": `sign_method` must be \"sum\" or \"count\", got \"",
              sign_method, "\"");
}

// deltas (N, P) floating; weights (N,) floating on deltas' device.
inline void check_deltas_weights(const at::Tensor& deltas, const at::Tensor& weights, const char* op) {
  TORCH_CHECK(deltas.dim() == 2, op, ": `deltas` must be (N, P) (one flattened task vector per row), got shape ",
              shape_str(deltas));
  check_float(deltas, op, "deltas");
  TORCH_CHECK(weights.dim() == 1 && weights.size(0) == deltas.size(0), op, ": `weights` must be (N,) = (",
              deltas.size(0), ",) for `deltas` of shape ", shape_str(deltas), ", got shape ", shape_str(weights));
  check_float(weights, op, "weights");
  TORCH_CHECK(weights.device() == deltas.device(), op, ": `weights` is on ", weights.device(), " but `deltas` is on ",
              deltas.device());
}

// ---------------------------------------------------------------- CPU selection

// Key (see merge_math.h) of the k-th largest |x| among x[0..n), 1 <= k <= n.
// Expected O(n) and one streaming pass for large n: a deterministic sample of
// the keys brackets the answer, one parallel pass counts the keys above the
// bracket and gathers those inside it, and nth_element finishes on the gathered
// few percent.  If the bracket misses (improbable), nth_element on a copy of
// all keys -- still O(n) -- decides.  Exact in every case.
template <typename scalar_t, typename acc_t>
typename merge_math::MagKey<acc_t>::U kth_largest_key(const scalar_t* x, int64_t n, int64_t k) {
  using K = merge_math::MagKey<acc_t>;
  using U = typename K::U;
  auto key = [x](int64_t i) { return K::of(static_cast<acc_t>(x[i])); };
  auto full = [&]() {
    std::vector<U> v(n);
    at::parallel_for(0, n, 1 << 16, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) v[i] = key(i);
    });
    std::nth_element(v.begin(), v.begin() + (k - 1), v.end(), std::greater<U>());
    return v[k - 1];
  };
  constexpr int64_t kSample = 1 << 14;
  if (n <= 4 * kSample) return full();

  std::vector<U> smp(kSample);
  for (int64_t j = 0; j < kSample; ++j) {
    smp[j] = key(static_cast<int64_t>(merge_math::mix64(static_cast<uint64_t>(j) + 1) % static_cast<uint64_t>(n)));
  }
  std::sort(smp.begin(), smp.end(), std::greater<U>());
  const double q = static_cast<double>(k) / static_cast<double>(n);
  const double pos = q * kSample;
  const double margin = 4.0 * std::sqrt(kSample * q * (1.0 - q)) + 8.0;
  const int64_t hi_i = static_cast<int64_t>(std::floor(pos - margin));
  const int64_t lo_i = static_cast<int64_t>(std::ceil(pos + margin));
  const U hi = hi_i < 0 ? K::kNaN : smp[hi_i];
  const U lo = lo_i >= kSample ? U(0) : smp[lo_i];

  const int64_t chunks = std::min<int64_t>(64, (n + (1 << 16) - 1) >> 16);
  const int64_t per = (n + chunks - 1) / chunks;
  std::vector<std::vector<U>> bufs(chunks);
  std::vector<int64_t> above(chunks, 0);
  at::parallel_for(0, chunks, 1, [&](int64_t cb, int64_t ce) {
    for (int64_t c = cb; c < ce; ++c) {
      const int64_t b = c * per, e = std::min(n, b + per);
      int64_t a = 0;
      auto& buf = bufs[c];
      buf.reserve(static_cast<size_t>((e - b) * (lo_i - hi_i + 16) / kSample + 64));
      const U span = hi - lo;
      for (int64_t i = b; i < e; ++i) {
        const U u = key(i);
        a += static_cast<int64_t>(u > hi);                  // branch-free: ~q of the keys
        if (static_cast<U>(u - lo) <= span) buf.push_back(u);  // rare (a few %): predictable
      }
      above[c] = a;
    }
  });
  int64_t n_above = 0, n_in = 0;
  for (int64_t c = 0; c < chunks; ++c) {
    n_above += above[c];
    n_in += static_cast<int64_t>(bufs[c].size());
  }
  if (!(n_above < k && k <= n_above + n_in)) return full();
  std::vector<U> v;
  v.reserve(n_in);
  for (auto& b : bufs) v.insert(v.end(), b.begin(), b.end());
  const int64_t r = k - n_above;  // rank inside the bracket, from the top
  std::nth_element(v.begin(), v.begin() + (r - 1), v.end(), std::greater<U>());
  return v[r - 1];
}

// Threshold key for "keep the top k of n": kNone keeps nothing (k == 0).
template <typename scalar_t, typename acc_t>
typename merge_math::MagKey<acc_t>::U keep_key(const scalar_t* x, int64_t n, int64_t k) {
  if (k <= 0) return merge_math::MagKey<acc_t>::kNone;
  return kth_largest_key<scalar_t, acc_t>(x, n, k);
}

// ------------------------------------------------------- CPU fused consensus
//
// One pass over deltas (N, P) in column chunks that stay in L1/L2: `value(i, p)`
// gives model i's (trimmed or dropped-and-rescaled) delta at p in acc_t.
//   consensus == false:  out = Σ_i w_i v_i              (÷ Σ_i w_i if normalize)
//   consensus == true :  TIES election + disjoint sum/mean (mergekit semantics):
//     s_i = w_i v_i; elected e = +1 if Σ_i s_i >= 0 (sum) / Σ_i sign(s_i) >= 0 (count) else -1;
//     num = Σ_{sign(s_i) == e} s_i;  den = Σ_{sign(s_i) == e} w_i;
//     out = num / den if normalize and den != 0 else num.
//   NaN policy: out = NaN wherever Σ_i s_i is NaN (a kept NaN delta, or kept +inf/-inf that cancel).
// Branch-free select: v if keep else +0.0 (exact; never inf·0 = NaN).  The inner
// loops below are written without data-dependent branches -- random signs and
// random keep decisions would otherwise mispredict several times per element.
template <typename acc_t>
inline acc_t keep_or_zero(bool keep, acc_t v) {
  using U = typename merge_math::MagKey<acc_t>::U;
  U b;
  std::memcpy(&b, &v, sizeof(b));
  b &= U(0) - static_cast<U>(keep);
  std::memcpy(&v, &b, sizeof(b));
  return v;
}

template <typename scalar_t, typename acc_t, typename ValueFn>
struct CombineArgs {
  int64_t N, P;
  const acc_t* w;
  bool consensus, count_method, normalize;
  acc_t lin_div;
  scalar_t* out;
  const ValueFn* value;
};

constexpr int64_t kCombineBlock = 1024;

template <typename scalar_t, typename acc_t, typename ValueFn>
__attribute__((always_inline)) inline void combine_chunks(const CombineArgs<scalar_t, acc_t, ValueFn>& a, int64_t cb,
                                                          int64_t ce) {
  constexpr int64_t B = kCombineBlock;
  const ValueFn& value = *a.value;
  alignas(64) acc_t S[B], C[B], num[B], den[B];
  for (int64_t c = cb; c < ce; ++c) {
    const int64_t p0 = c * B, len = std::min(B, a.P - p0);
    for (int64_t j = 0; j < len; ++j) S[j] = C[j] = num[j] = den[j] = acc_t(0);
    for (int64_t i = 0; i < a.N; ++i) {
      const acc_t wi = a.w[i];
      for (int64_t j = 0; j < len; ++j) {
        const acc_t s = wi * value(i, p0 + j);
        S[j] += s;
        C[j] += static_cast<acc_t>(s > acc_t(0)) - static_cast<acc_t>(s < acc_t(0));
      }
    }
    if (!a.consensus) {
      for (int64_t j = 0; j < len; ++j) a.out[p0 + j] = static_cast<scalar_t>(S[j] / a.lin_div);
      continue;
    }
    // Elected sign e = ±1 kept in C; s agrees iff s·e > 0 (false for 0 and NaN).
    const acc_t* E = a.count_method ? C : S;
    for (int64_t j = 0; j < len; ++j) C[j] = E[j] >= acc_t(0) ? acc_t(1) : acc_t(-1);
    for (int64_t i = 0; i < a.N; ++i) {
      const acc_t wi = a.w[i];
      for (int64_t j = 0; j < len; ++j) {
        const acc_t s = wi * value(i, p0 + j);
        const bool agree = s * C[j] > acc_t(0);
        num[j] += keep_or_zero<acc_t>(agree, s);
        den[j] += keep_or_zero<acc_t>(agree, wi);
      }
    }
    for (int64_t j = 0; j < len; ++j) {
      const acc_t q = (a.normalize && den[j] != acc_t(0)) ? num[j] / den[j] : num[j];
      a.out[p0 + j] = static_cast<scalar_t>(std::isnan(S[j]) ? S[j] : q);
    }
  }
}

// The same chunk loop compiled twice: for the baseline ISA the library targets
// (SSE2 on x86-64) and for AVX2 (8-wide, 32-bit integer multiplies for DARE's
// hash), picked at run time.  No FMA: results do not depend on the CPU.
template <typename scalar_t, typename acc_t, typename ValueFn>
void combine_chunks_base(const CombineArgs<scalar_t, acc_t, ValueFn>& a, int64_t cb, int64_t ce) {
  combine_chunks(a, cb, ce);
}
#if defined(__GNUC__) && defined(__x86_64__)
#define LRO_MERGE_AVX2 1
template <typename scalar_t, typename acc_t, typename ValueFn>
__attribute__((target("avx2"))) void combine_chunks_avx2(const CombineArgs<scalar_t, acc_t, ValueFn>& a, int64_t cb,
                                                         int64_t ce) {
  combine_chunks(a, cb, ce);
}
inline bool cpu_has_avx2() {
  static const bool has = __builtin_cpu_supports("avx2");
  return has;
}
#endif

template <typename scalar_t, typename acc_t, typename ValueFn>
void combine_cpu(int64_t N, int64_t P, const std::vector<acc_t>& w, bool consensus, bool count_method,
                 bool normalize, scalar_t* out, const ValueFn& value) {
  acc_t wsum = 0;
  for (auto v : w) wsum += v;
  const acc_t lin_div = (normalize && std::abs(wsum) >= acc_t(1e-8)) ? wsum : acc_t(1);
  const CombineArgs<scalar_t, acc_t, ValueFn> args{N, P, w.data(), consensus, count_method, normalize, lin_div, out,
                                                   &value};
  auto fn = &combine_chunks_base<scalar_t, acc_t, ValueFn>;
#ifdef LRO_MERGE_AVX2
  if (cpu_has_avx2()) fn = &combine_chunks_avx2<scalar_t, acc_t, ValueFn>;
#endif
  at::parallel_for(0, (P + kCombineBlock - 1) / kCombineBlock, 8,
                   [&](int64_t cb, int64_t ce) { fn(args, cb, ce); });
}

template <typename acc_t>
std::vector<acc_t> weights_vector(const at::Tensor& weights) {
  auto wc = weights.to(at::kCPU, at::kDouble).contiguous();
  const double* p = wc.data_ptr<double>();
  return std::vector<acc_t>(p, p + wc.numel());
}

}  // namespace merge_detail
}  // namespace lowrank_ops
