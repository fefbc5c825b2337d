// CUDA kernels of the merge family, all in one translation unit (one nvcc
// compile of the torch headers for the whole family).  UNVALIDATED: compiled,
// never run on a GPU (see docs/kernels.md).  Correct by construction:
//   * thresholds: ATen's radix select (at::kthvalue) on integer magnitude keys
//     (merge_math.h), so ordering, NaN ranking and the result are the CPU's;
//   * the rest: grid-stride elementwise kernels, one thread per coordinate,
//     looping over the N models in order with the same arithmetic as the CPU
//     loop (merge_common.h, combine_cpu) and the same counter hash for DARE.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/abs.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/isnan.h>
#include <ATen/ops/kthvalue.h>
#include <ATen/ops/scalar_tensor.h>
#include <ATen/ops/where.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "merge/merge_common.h"

namespace lowrank_ops {
namespace {

using merge_math::MagKey;

constexpr int kThreads = 256;

inline int blocks_for(int64_t n) {
  const int64_t b = (n + kThreads - 1) / kThreads;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(b, 65535 * 8)));
}

// Integer magnitude keys of x (int32 for <=32-bit floats, int64 for fp64), the
// device twin of MagKey::of: bits of |x| in the accumulation type, NaN canonical.
at::Tensor magnitude_keys(const at::Tensor& x) {
  const bool dbl = x.scalar_type() == at::kDouble;
  at::Tensor a = at::abs(x.to(dbl ? at::kDouble : at::kFloat));
  at::Tensor k = a.view(dbl ? at::kLong : at::kInt);
  const int64_t nan_key = dbl ? static_cast<int64_t>(MagKey<double>::kNaN) : static_cast<int64_t>(MagKey<float>::kNaN);
  return at::where(at::isnan(a), at::scalar_tensor(nan_key, k.options()), k);
}

// k-th largest key per row of keys (R, n): the (n-k+1)-th smallest.
at::Tensor kth_largest_keys(const at::Tensor& keys, int64_t k) {
  return std::get<0>(at::kthvalue(keys, keys.size(-1) - k + 1, /*dim=*/-1));
}

template <typename scalar_t, typename acc_t, typename U>
__global__ void ties_kernel(const scalar_t* __restrict__ d, const acc_t* __restrict__ w, const U* __restrict__ thr,
                            int64_t N, int64_t P, bool count_method, bool normalize, scalar_t* __restrict__ out) {
  using K = MagKey<acc_t>;
  for (int64_t p = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; p < P; p += (int64_t)gridDim.x * blockDim.x) {
    acc_t S = 0, C = 0;
    for (int64_t i = 0; i < N; ++i) {
      const acc_t v = static_cast<acc_t>(d[i * P + p]);
      const acc_t s = w[i] * (K::of(v) >= thr[i] ? v : acc_t(0));
      S += s;
      C += (s > acc_t(0)) ? acc_t(1) : ((s < acc_t(0)) ? acc_t(-1) : acc_t(0));
    }
    const acc_t e = (count_method ? C : S) >= acc_t(0) ? acc_t(1) : acc_t(-1);
    acc_t num = 0, den = 0;
    for (int64_t i = 0; i < N; ++i) {
      const acc_t v = static_cast<acc_t>(d[i * P + p]);
      const acc_t s = w[i] * (K::of(v) >= thr[i] ? v : acc_t(0));
      const bool agree = e > 0 ? s > acc_t(0) : s < acc_t(0);
      num += agree ? s : acc_t(0);
      den += agree ? w[i] : acc_t(0);
    }
    acc_t r = (normalize && den != acc_t(0)) ? num / den : num;
    if (S != S) r = S;  // NaN policy of the CPU kernel
    out[p] = static_cast<scalar_t>(r);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void dare_kernel(const scalar_t* __restrict__ d, const acc_t* __restrict__ w, uint64_t seed, uint32_t T,
                            acc_t dens, int64_t N, int64_t P, bool consensus, bool count_method, bool normalize,
                            acc_t lin_div, scalar_t* __restrict__ out) {
  for (int64_t p = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; p < P; p += (int64_t)gridDim.x * blockDim.x) {
    const uint64_t blk = static_cast<uint64_t>(p) >> 32;
    const uint32_t lo = static_cast<uint32_t>(p);
    acc_t S = 0, C = 0;
    for (int64_t i = 0; i < N; ++i) {
      const uint32_t h = merge_math::dare_hash(merge_math::dare_block_key(seed, i, blk), lo);
      const acc_t v = static_cast<acc_t>(d[i * P + p]);
      const acc_t s = w[i] * ((h >> 8) < T ? v / dens : acc_t(0));
      S += s;
      C += (s > acc_t(0)) ? acc_t(1) : ((s < acc_t(0)) ? acc_t(-1) : acc_t(0));
    }
    if (!consensus) {
      out[p] = static_cast<scalar_t>(S / lin_div);
      continue;
    }
    const acc_t e = (count_method ? C : S) >= acc_t(0) ? acc_t(1) : acc_t(-1);
    acc_t num = 0, den = 0;
    for (int64_t i = 0; i < N; ++i) {
      const uint32_t h = merge_math::dare_hash(merge_math::dare_block_key(seed, i, blk), lo);
      const acc_t v = static_cast<acc_t>(d[i * P + p]);
      const acc_t s = w[i] * ((h >> 8) < T ? v / dens : acc_t(0));
      const bool agree = e > 0 ? s > acc_t(0) : s < acc_t(0);
      num += agree ? s : acc_t(0);
      den += agree ? w[i] : acc_t(0);
    }
    acc_t r = (normalize && den != acc_t(0)) ? num / den : num;
    if (S != S) r = S;
    out[p] = static_cast<scalar_t>(r);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void nm_mask_kernel(const scalar_t* __restrict__ x, const bool* __restrict__ forbidden, int64_t G,
                               int64_t n, int64_t m, bool* __restrict__ out) {
  using K = MagKey<acc_t>;
  using U = typename K::U;
  for (int64_t g = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; g < G; g += (int64_t)gridDim.x * blockDim.x) {
    const int64_t base = g * m;
    for (int64_t j = 0; j < m; ++j) out[base + j] = false;
    for (int64_t r = 0; r < n; ++r) {
      int64_t best = -1;
      U bk = 0;
      for (int64_t j = 0; j < m; ++j) {
        if (out[base + j] || (forbidden && forbidden[base + j])) continue;
        U u = K::of(static_cast<acc_t>(x[base + j]));
        if (u == K::kNaN) u = K::kInf;
        if (best < 0 || u > bk) {
          best = j;
          bk = u;
        }
      }
      if (best < 0) break;
      out[base + best] = true;
    }
  }
}

template <typename scalar_t, typename acc_t>
__global__ void sign_consensus_kernel(const scalar_t* __restrict__ d, const acc_t* __restrict__ w, acc_t eps,
                                      int64_t N, int64_t P, bool count_method, scalar_t* __restrict__ sign,
                                      int32_t* __restrict__ support, int32_t* __restrict__ count) {
  for (int64_t p = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; p < P; p += (int64_t)gridDim.x * blockDim.x) {
    acc_t S = 0;
    int32_t c = 0;
    for (int64_t i = 0; i < N; ++i) {
      const acc_t v = static_cast<acc_t>(d[i * P + p]);
      const bool on = (v < 0 ? -v : v) > eps;
      const acc_t s = w[i] * v;
      S += on ? (count_method ? acc_t((s > 0) - (s < 0)) : s) : acc_t(0);
      c += on;
    }
    const bool pos = S >= acc_t(0);
    int32_t a = 0;
    for (int64_t i = 0; i < N; ++i) {
      const acc_t v = static_cast<acc_t>(d[i * P + p]);
      const acc_t s = w[i] * v;
      const bool on = (v < 0 ? -v : v) > eps;
      a += on && (pos ? s > acc_t(0) : s < acc_t(0));
    }
    sign[p] = static_cast<scalar_t>(pos ? 1 : -1);
    support[p] = a;
    count[p] = c;
  }
}

at::Tensor acc_weights(const at::Tensor& weights, at::ScalarType acc) { return weights.to(acc).contiguous(); }

}  // namespace

at::Tensor magnitude_threshold_cuda(const at::Tensor& x, double density) {
  constexpr const char* op = "magnitude_threshold";
  merge_detail::check_float(x, op, "x");
  merge_detail::check_density(density, op);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t n = x.numel();
  const int64_t k = merge_math::topk_count(density, n);
  if (k == 0) return at::full({}, std::numeric_limits<double>::infinity(), x.options());
  at::Tensor key = kth_largest_keys(magnitude_keys(x.reshape({-1})), k);
  const bool dbl = x.scalar_type() == at::kDouble;
  return key.view(dbl ? at::kDouble : at::kFloat).reshape({}).to(x.scalar_type());
}

at::Tensor ties_merge_cuda(const at::Tensor& deltas, const at::Tensor& weights, double density,
                           c10::string_view sign_method, bool normalize) {
  constexpr const char* op = "ties_merge";
  const std::string method(sign_method);
  merge_detail::check_ties_args(deltas, weights, density, method, op);
  const c10::cuda::CUDAGuard guard(deltas.device());
  auto d = deltas.contiguous();
  const int64_t N = d.size(0), P = d.size(1);
  at::Tensor out = at::empty({P}, d.options());
  if (P == 0) return out;
  const int64_t k = merge_math::topk_count(density, P);
  const bool dbl = d.scalar_type() == at::kDouble;
  at::Tensor thr = k == 0 ? at::full({N}, dbl ? static_cast<int64_t>(-1) : static_cast<int64_t>(-1),
                                     d.options().dtype(dbl ? at::kLong : at::kInt))
                          : kth_largest_keys(magnitude_keys(d), k).contiguous();
  // k == 0: all-ones bit pattern is MagKey::kNone as unsigned (keeps nothing).
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, d.scalar_type(), op, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    using U = typename MagKey<acc_t>::U;
    at::Tensor w = acc_weights(weights, dbl ? at::kDouble : at::kFloat);
    ties_kernel<scalar_t, acc_t, U><<<blocks_for(P), kThreads, 0, stream>>>(
        d.data_ptr<scalar_t>(), w.data_ptr<acc_t>(), reinterpret_cast<const U*>(thr.data_ptr()), N, P,
        method == "count", normalize, out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor dare_merge_cuda(const at::Tensor& deltas, const at::Tensor& weights, double density, int64_t seed,
                           c10::string_view consensus, c10::string_view sign_method, bool normalize) {
  constexpr const char* op = "dare_merge";
  const std::string cons(consensus), method(sign_method);
  merge_detail::check_dare_args(deltas, weights, density, cons, method, op);
  const c10::cuda::CUDAGuard guard(deltas.device());
  auto d = deltas.contiguous();
  const int64_t N = d.size(0), P = d.size(1);
  at::Tensor out = at::empty({P}, d.options());
  if (P == 0) return out;
  const bool dbl = d.scalar_type() == at::kDouble;
  // Σ w on the host (weights are N scalars; the CPU kernel does the same sum in acc_t).
  const auto wh = merge_detail::weights_vector<double>(weights);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, d.scalar_type(), op, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    acc_t wsum = 0;
    for (double v : wh) wsum += static_cast<acc_t>(v);
    const acc_t lin_div = (normalize && (wsum < 0 ? -wsum : wsum) >= acc_t(1e-8)) ? wsum : acc_t(1);
    at::Tensor w = acc_weights(weights, dbl ? at::kDouble : at::kFloat);
    dare_kernel<scalar_t, acc_t><<<blocks_for(P), kThreads, 0, stream>>>(
        d.data_ptr<scalar_t>(), w.data_ptr<acc_t>(), static_cast<uint64_t>(seed),
        merge_math::dare_keep_threshold(density), static_cast<acc_t>(density), N, P, cons == "ties",
        method == "count", normalize, lin_div, out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor nm_mask_cuda(const at::Tensor& x, int64_t n, int64_t m, const OptTensor& forbidden) {
  constexpr const char* op = "nm_mask";
  merge_detail::check_nm_mask_args(x, n, m, forbidden, op);
  const c10::cuda::CUDAGuard guard(x.device());
  auto xc = x.contiguous();
  at::Tensor fb = forbidden.has_value() ? forbidden->contiguous() : at::Tensor();
  at::Tensor out = at::empty(x.sizes(), x.options().dtype(at::kBool));
  const int64_t G = xc.numel() / m;
  if (G == 0) return out;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), op, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    nm_mask_kernel<scalar_t, acc_t><<<blocks_for(G), kThreads, 0, stream>>>(
        xc.data_ptr<scalar_t>(), fb.defined() ? fb.data_ptr<bool>() : nullptr, G, n, m, out.data_ptr<bool>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sign_consensus_cuda(const at::Tensor& deltas, const OptTensor& weights,
                                                                   double eps, c10::string_view sign_method) {
  constexpr const char* op = "sign_consensus";
  const std::string method(sign_method);
  merge_detail::check_sign_consensus_args(deltas, weights, eps, method, op);
  const c10::cuda::CUDAGuard guard(deltas.device());
  auto d = deltas.contiguous();
  const int64_t N = d.size(0), P = d.size(1);
  at::Tensor sign, support, count;
  std::tie(sign, support, count) = merge_detail::sign_consensus_outputs(d);
  if (P == 0) return {sign, support, count};
  const bool dbl = d.scalar_type() == at::kDouble;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, d.scalar_type(), op, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    at::Tensor w = weights.has_value() ? acc_weights(*weights, dbl ? at::kDouble : at::kFloat)
                                       : at::full({N}, 1.0, d.options().dtype(dbl ? at::kDouble : at::kFloat));
    sign_consensus_kernel<scalar_t, acc_t><<<blocks_for(P), kThreads, 0, stream>>>(
        d.data_ptr<scalar_t>(), w.data_ptr<acc_t>(), static_cast<acc_t>(eps), N, P, method == "count",
        sign.data_ptr<scalar_t>(), support.data_ptr<int32_t>(), count.data_ptr<int32_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {sign, support, count};
}

}  // namespace lowrank_ops

TORCH_LIBRARY_IMPL(lowrank_ops, CUDA, m) {
  m.impl("magnitude_threshold", &lowrank_ops::magnitude_threshold_cuda);
  m.impl("ties_merge", &lowrank_ops::ties_merge_cuda);
  m.impl("dare_merge", &lowrank_ops::dare_merge_cuda);
  m.impl("nm_mask", &lowrank_ops::nm_mask_cuda);
  m.impl("sign_consensus", &lowrank_ops::sign_consensus_cuda);
}
