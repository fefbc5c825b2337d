// Shared pieces of the merge family: argument checks (CPU and CUDA) and the
// CPU building blocks -- O(n) k-th-largest-magnitude selection and the fused
// per-coordinate consensus loop that TIES and DARE-TIES share.
#pragma once

#include "common.h"

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
#include <type_traits>
#include <vector>

#include "merge/merge_math.h"
#include "ops.h"

namespace lowrank_ops {
namespace merge_detail {

using lowrank_ops::shape_str;

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

// The argument checks of ties_merge, dare_merge, sign_consensus and nm_mask, shared
// by the CPU and CUDA kernels so both reject the same inputs with the same messages.
inline void check_ties_args(const at::Tensor& deltas, const at::Tensor& weights, double density,
                            const std::string& sign_method, const char* op) {
  check_deltas_weights(deltas, weights, op);
  check_density(density, op);
  check_sign_method(sign_method, op);
}

// The three (P,) outputs of sign_consensus on deltas' device: sign (deltas' dtype), support and count (int32).
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> sign_consensus_outputs(const at::Tensor& deltas) {
  const int64_t P = deltas.size(1);
  return {at::empty({P}, deltas.options()), at::empty({P}, deltas.options().dtype(at::kInt)),
          at::empty({P}, deltas.options().dtype(at::kInt))};
}

inline void check_dare_args(const at::Tensor& deltas, const at::Tensor& weights, double density,
                            const std::string& consensus, const std::string& sign_method, const char* op) {
  check_deltas_weights(deltas, weights, op);
  check_density(density, op);
  TORCH_CHECK(consensus == "none" || consensus == "ties", op, ": `consensus` must be \"none\" or \"ties\", got \"",
              consensus, "\"");
  check_sign_method(sign_method, op);
}

inline void check_sign_consensus_args(const at::Tensor& deltas, const OptTensor& weights, double eps,
                                      const std::string& sign_method, const char* op) {
  if (weights.has_value()) {
    check_deltas_weights(deltas, *weights, op);
  } else {
    TORCH_CHECK(deltas.dim() == 2, op, ": `deltas` must be (N, P), got shape ", shape_str(deltas));
    check_float(deltas, op, "deltas");
  }
  TORCH_CHECK(eps >= 0.0, op, ": `eps` must be >= 0, got ", eps);
  check_sign_method(sign_method, op);
}

inline void check_nm_mask_args(const at::Tensor& x, int64_t n, int64_t m, const OptTensor& forbidden, const char* op) {
  check_float(x, op, "x");
  TORCH_CHECK(m >= 1 && n >= 0 && n <= m, op, ": need 0 <= n <= m and m >= 1, got n=", n, ", m=", m);
  TORCH_CHECK(x.dim() >= 1, op, ": `x` must have at least one dim, got a 0-d tensor");
  TORCH_CHECK(x.size(-1) % m == 0, op, ": the last dim of `x` (", x.size(-1), ", shape ", shape_str(x),
              ") must be a multiple of m=", m, "; pad or reshape the tensor first");
  if (forbidden.has_value()) {
    TORCH_CHECK(forbidden->scalar_type() == at::kBool, op, ": `forbidden` must be bool, got ", forbidden->scalar_type());
    TORCH_CHECK(forbidden->sizes() == x.sizes(), op, ": `forbidden` must have x's shape ", shape_str(x),
                ", got ", shape_str(*forbidden));
    TORCH_CHECK(forbidden->device() == x.device(), op, ": `forbidden` is on ", forbidden->device(), " but `x` is on ",
                x.device());
  }
}

// ---------------------------------------------------------------- CPU selection

// Band scan of the selection pass on x[0..len): returns how many keys are
// > hi (added to *above) and appends the keys in [lo, hi] to tmp (returns
// their count).  Generic branch-free loop; fp32 on AVX2 uses the 8-wide
// version below (left-pack by a 256-entry permutation table).
template <typename scalar_t, typename acc_t>
inline int64_t band_scan(const scalar_t* x, int64_t len, typename merge_math::MagKey<acc_t>::U lo,
                         typename merge_math::MagKey<acc_t>::U hi, typename merge_math::MagKey<acc_t>::U* tmp,
                         int64_t* above) {
  using K = merge_math::MagKey<acc_t>;
  using U = typename K::U;
  const U span = hi - lo;
  int64_t a = 0, m = 0;
  for (int64_t i = 0; i < len; ++i) {
    const U u = K::of(static_cast<acc_t>(x[i]));
    a += static_cast<int64_t>(u > hi);
    tmp[m] = u;
    m += static_cast<int64_t>(static_cast<U>(u - lo) <= span);
  }
  *above += a;
  return m;
}

// Host-compiler only: nvcc (which includes this header for the checks) never
// sees the intrinsics.
#if defined(__GNUC__) && defined(__x86_64__) && !defined(__CUDACC__)
#define LRO_MERGE_SCAN_AVX2 1
}  // namespace merge_detail
}  // namespace lowrank_ops
#include <immintrin.h>
namespace lowrank_ops {
namespace merge_detail {
// lut[mask]: the indices of mask's set bits, packed low-first, one per byte.
inline const uint64_t* left_pack_lut() {
  static const std::vector<uint64_t> lut = [] {
    std::vector<uint64_t> t(256);
    for (int mask = 0; mask < 256; ++mask) {
      uint64_t v = 0;
      int n = 0;
      for (int b = 0; b < 8; ++b)
        if (mask >> b & 1) v |= static_cast<uint64_t>(b) << (8 * n++);
      t[mask] = v;
    }
    return t;
  }();
  return lut.data();
}

// fp32 band scan, 8 keys per step.  Keys are < 2^31, so signed compares order
// them; tmp needs 8 spare slots (each step stores a full vector).
__attribute__((target("avx2,popcnt"))) inline int64_t band_scan_f32_avx2(const float* x, int64_t len, uint32_t lo,
                                                                         uint32_t hi, uint32_t* tmp, int64_t* above,
                                                                         const uint64_t* lut) {
  using K = merge_math::MagKey<float>;
  const __m256i absm = _mm256_set1_epi32(0x7FFFFFFF), inf = _mm256_set1_epi32(static_cast<int>(K::kInf)),
                nan = _mm256_set1_epi32(static_cast<int>(K::kNaN)), vhi = _mm256_set1_epi32(static_cast<int>(hi)),
                vlo1 = _mm256_set1_epi32(static_cast<int>(lo) - 1);  // lo == 0 -> -1: every key passes
  __m256i acc = _mm256_setzero_si256();
  int64_t m = 0, i = 0;
  for (; i + 8 <= len; i += 8) {
    __m256i u = _mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + i)), absm);
    u = _mm256_blendv_epi8(u, nan, _mm256_cmpgt_epi32(u, inf));
    const __m256i gt = _mm256_cmpgt_epi32(u, vhi);
    acc = _mm256_sub_epi32(acc, gt);
    const __m256i in = _mm256_andnot_si256(gt, _mm256_cmpgt_epi32(u, vlo1));
    const int mask = _mm256_movemask_ps(_mm256_castsi256_ps(in));
    const __m256i perm = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(lut + mask)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(tmp + m), _mm256_permutevar8x32_epi32(u, perm));
    m += __builtin_popcount(static_cast<unsigned>(mask));
  }
  alignas(32) int32_t c[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(c), acc);
  int64_t a = 0;
  for (int j = 0; j < 8; ++j) a += c[j];
  *above += a;
  return m + band_scan<float, float>(x + i, len - i, lo, hi, tmp + m, above);
}
#endif

// Keys (see merge_math.h) of the k-th largest |x| in each of the R rows
// x[r*n .. r*n+n), 1 <= k <= n, written to out[0..R).  Expected O(R n) and one
// streaming pass over all rows together for large n:
//   1. per row, a deterministic sample of kSample keys brackets the answer
//      [lo, hi] (two nth_element calls on the sample, rows in parallel);
//   2. ONE parallel pass over (row, chunk) tiles counts the keys above hi and
//      compacts those inside [lo, hi] -- a branch-free loop (the compaction
//      writes every key to a small scratch and advances by the in-band flag),
//      so neither random magnitudes nor the ~2-3 % band rate mispredict;
//   3. per row, nth_element on the gathered band (rows in parallel).
// A row whose bracket misses (improbable) falls back to nth_element on a copy
// of all its keys -- still O(n).  Exact in every case.
template <typename scalar_t, typename acc_t>
void kth_largest_keys(const scalar_t* x, int64_t R, int64_t n, int64_t k, typename merge_math::MagKey<acc_t>::U* out) {
  using K = merge_math::MagKey<acc_t>;
  using U = typename K::U;
  auto full = [&](int64_t r) {
    const scalar_t* xr = x + r * n;
    std::vector<U> v(n);
    at::parallel_for(0, n, 1 << 16, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) v[i] = K::of(static_cast<acc_t>(xr[i]));
    });
    std::nth_element(v.begin(), v.begin() + (k - 1), v.end(), std::greater<U>());
    out[r] = v[k - 1];
  };
  constexpr int64_t kSample = 1 << 14;
  if (n <= 4 * kSample) {
    for (int64_t r = 0; r < R; ++r) full(r);
    return;
  }
  const double q = static_cast<double>(k) / static_cast<double>(n);
  const double pos = q * kSample;
  const double margin = 4.0 * std::sqrt(kSample * q * (1.0 - q)) + 8.0;
  const int64_t hi_i = static_cast<int64_t>(std::floor(pos - margin));
  const int64_t lo_i = static_cast<int64_t>(std::ceil(pos + margin));
  std::vector<U> his(R), los(R);
  at::parallel_for(0, R, 1, [&](int64_t rb, int64_t re) {
    std::vector<U> smp(kSample);
    for (int64_t r = rb; r < re; ++r) {
      const scalar_t* xr = x + r * n;
      for (int64_t j = 0; j < kSample; ++j) {
        smp[j] = K::of(static_cast<acc_t>(
            xr[static_cast<int64_t>(merge_math::mix64(static_cast<uint64_t>(j) + 1) % static_cast<uint64_t>(n))]));
      }
      // hi = sample rank hi_i from the top, lo = rank lo_i (descending order).
      U hi = K::kNaN, lo = U(0);
      if (lo_i < kSample) {
        std::nth_element(smp.begin(), smp.begin() + lo_i, smp.end(), std::greater<U>());
        lo = smp[lo_i];
      }
      if (hi_i >= 0) {
        const auto last = lo_i < kSample ? smp.begin() + lo_i : smp.end();
        std::nth_element(smp.begin(), smp.begin() + hi_i, last, std::greater<U>());
        hi = smp[hi_i];
      }
      his[r] = hi;
      los[r] = lo;
    }
  });

  constexpr int64_t kTile = 1 << 16, kScratch = 2048;
#ifdef LRO_MERGE_SCAN_AVX2
  const bool vec = std::is_same<scalar_t, float>::value && __builtin_cpu_supports("avx2") &&
                   __builtin_cpu_supports("popcnt");
  const uint64_t* lut = vec ? left_pack_lut() : nullptr;
#endif
  const int64_t tiles = (n + kTile - 1) / kTile;
  std::vector<std::vector<U>> bufs(R * tiles);
  std::vector<int64_t> above(R * tiles, 0);
  const int64_t expect = kTile * (lo_i - hi_i + 16) / kSample + 64;
  at::parallel_for(0, R * tiles, 1, [&](int64_t tb, int64_t te) {
    alignas(64) U tmp[kScratch + 8];
    for (int64_t t = tb; t < te; ++t) {
      const int64_t r = t / tiles, b = (t % tiles) * kTile, e = std::min(n, b + kTile);
      const scalar_t* xr = x + r * n;
      const U hi = his[r], lo = los[r];
      auto& buf = bufs[t];
      buf.reserve(static_cast<size_t>(expect));
      int64_t a = 0;
      for (int64_t s0 = b; s0 < e; s0 += kScratch) {
        const int64_t len = std::min(e, s0 + kScratch) - s0;
        int64_t m;
#ifdef LRO_MERGE_SCAN_AVX2
        if (vec) {
          m = band_scan_f32_avx2(reinterpret_cast<const float*>(xr + s0), len, static_cast<uint32_t>(lo),
                                 static_cast<uint32_t>(hi), reinterpret_cast<uint32_t*>(tmp), &a, lut);
        } else
#endif
        {
          m = band_scan<scalar_t, acc_t>(xr + s0, len, lo, hi, tmp, &a);
        }
        buf.insert(buf.end(), tmp, tmp + m);
      }
      above[t] = a;
    }
  });
  at::parallel_for(0, R, 1, [&](int64_t rb, int64_t re) {
    for (int64_t r = rb; r < re; ++r) {
      int64_t n_above = 0, n_in = 0;
      for (int64_t t = r * tiles; t < (r + 1) * tiles; ++t) {
        n_above += above[t];
        n_in += static_cast<int64_t>(bufs[t].size());
      }
      if (!(n_above < k && k <= n_above + n_in)) {
        full(r);  // nested parallel_for runs inline here
        continue;
      }
      std::vector<U> v;
      v.reserve(n_in);
      for (int64_t t = r * tiles; t < (r + 1) * tiles; ++t) {
        v.insert(v.end(), bufs[t].begin(), bufs[t].end());
        std::vector<U>().swap(bufs[t]);
      }
      const int64_t rk = k - n_above;  // rank inside the bracket, from the top
      std::nth_element(v.begin(), v.begin() + (rk - 1), v.end(), std::greater<U>());
      out[r] = v[rk - 1];
    }
  });
}

template <typename scalar_t, typename acc_t>
typename merge_math::MagKey<acc_t>::U kth_largest_key(const scalar_t* x, int64_t n, int64_t k) {
  typename merge_math::MagKey<acc_t>::U key;
  kth_largest_keys<scalar_t, acc_t>(x, 1, n, k, &key);
  return key;
}

// Threshold key for "keep the top k of n": kNone keeps nothing (k == 0).
template <typename scalar_t, typename acc_t>
typename merge_math::MagKey<acc_t>::U keep_key(const scalar_t* x, int64_t n, int64_t k) {
  if (k <= 0) return merge_math::MagKey<acc_t>::kNone;
  return kth_largest_key<scalar_t, acc_t>(x, n, k);
}

// keep_key for each of the R rows of x (R, n), all rows in one streaming pass.
template <typename scalar_t, typename acc_t>
void keep_keys(const scalar_t* x, int64_t R, int64_t n, int64_t k, typename merge_math::MagKey<acc_t>::U* out) {
  if (k <= 0) {
    for (int64_t r = 0; r < R; ++r) out[r] = merge_math::MagKey<acc_t>::kNone;
    return;
  }
  kth_largest_keys<scalar_t, acc_t>(x, R, n, k, out);
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

// c ? a : b on the bit patterns (exact, branch-free).
template <typename acc_t>
inline acc_t select_bits(bool c, acc_t a, acc_t b) {
  using U = typename merge_math::MagKey<acc_t>::U;
  U ua, ub;
  std::memcpy(&ua, &a, sizeof(ua));
  std::memcpy(&ub, &b, sizeof(ub));
  const U m = U(0) - static_cast<U>(c);
  ua = (ua & m) | (ub & ~m);
  std::memcpy(&a, &ua, sizeof(ua));
  return a;
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

// Columns per chunk: each of the N rows is read as one 32 KiB run (fp32), long
// enough for the hardware prefetchers (4 KiB runs, one page per row, left
// the loop latency-bound at ~1/3 of streaming speed); the chunk's scratch
// (N + 4) x B values stays in L2.
constexpr int64_t kCombineBlock = 8192;

template <typename scalar_t, typename acc_t, typename ValueFn>
__attribute__((always_inline)) inline void combine_chunks(const CombineArgs<scalar_t, acc_t, ValueFn>& a, int64_t cb,
                                                          int64_t ce, acc_t* V) {
  constexpr int64_t B = kCombineBlock;
  const ValueFn& value = *a.value;
  acc_t* __restrict S = V + a.N * B;
  acc_t* __restrict C = S + B;
  acc_t* __restrict num = C + B;
  acc_t* __restrict den = num + B;
  for (int64_t c = cb; c < ce; ++c) {
    const int64_t p0 = c * B, len = std::min(B, a.P - p0);
    for (int64_t j = 0; j < len; ++j) S[j] = C[j] = num[j] = den[j] = acc_t(0);
    // First sweep: s_i = w_i v_i, computed once per element (the threshold test
    // or DARE hash is not repeated) and staged in V (N x B, L1/L2-resident).
    for (int64_t i = 0; i < a.N; ++i) {
      const acc_t wi = a.w[i];
      acc_t* __restrict Vi = V + i * B;
      for (int64_t j = 0; j < len; ++j) {
        const acc_t s = wi * value(i, p0 + j);
        Vi[j] = s;
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
      const acc_t* __restrict Vi = V + i * B;
      for (int64_t j = 0; j < len; ++j) {
        const acc_t s = Vi[j];
        const bool agree = s * C[j] > acc_t(0);
        num[j] += keep_or_zero<acc_t>(agree, s);
        den[j] += keep_or_zero<acc_t>(agree, wi);
      }
    }
    // Branch-free (den == 0 for ~(1-density)^N of the coordinates would
    // mispredict): num / 1 == num exactly, so divide by den or by 1.
    // The NaN select is a bit blend, which GCC vectorizes (a ?: on isnan it does not).
    if (a.normalize) {
      for (int64_t j = 0; j < len; ++j) {
        const acc_t dd = den[j] + keep_or_zero<acc_t>(den[j] == acc_t(0), acc_t(1));
        num[j] = select_bits<acc_t>(S[j] != S[j], S[j], num[j] / dd);
      }
    } else {
      for (int64_t j = 0; j < len; ++j) num[j] = select_bits<acc_t>(S[j] != S[j], S[j], num[j]);
    }
    for (int64_t j = 0; j < len; ++j) a.out[p0 + j] = static_cast<scalar_t>(num[j]);
  }
}

// The same chunk loop compiled twice: for the baseline ISA the library targets
// (SSE2 on x86-64) and for AVX2 (8-wide, 32-bit integer multiplies for DARE's
// hash), picked at run time.  No FMA: results do not depend on the CPU.
template <typename scalar_t, typename acc_t, typename ValueFn>
void combine_chunks_base(const CombineArgs<scalar_t, acc_t, ValueFn>& a, int64_t cb, int64_t ce, acc_t* V) {
  combine_chunks(a, cb, ce, V);
}
#if defined(__GNUC__) && defined(__x86_64__)
#define LRO_MERGE_AVX2 1
template <typename scalar_t, typename acc_t, typename ValueFn>
__attribute__((target("avx2"))) void combine_chunks_avx2(const CombineArgs<scalar_t, acc_t, ValueFn>& a, int64_t cb,
                                                         int64_t ce, acc_t* V) {
  combine_chunks(a, cb, ce, V);
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
  at::parallel_for(0, (P + kCombineBlock - 1) / kCombineBlock, 1,
                   [&](int64_t cb, int64_t ce) {
                     std::vector<acc_t> V(static_cast<size_t>((N + 4) * kCombineBlock));
                     fn(args, cb, ce, V.data());
                   });
}

template <typename acc_t>
std::vector<acc_t> weights_vector(const at::Tensor& weights) {
  auto wc = weights.to(at::kCPU, at::kDouble).contiguous();
  const double* p = wc.data_ptr<double>();
  return std::vector<acc_t>(p, p + wc.numel());
}

}  // namespace merge_detail
}  // namespace lowrank_ops
