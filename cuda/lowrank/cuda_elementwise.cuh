// CUDA elementwise pieces shared by the lowrank family's kernels: the row
// epilogue (scale/bias per output column) and the column dot product used by
// the out_scale / magnitude gradients.  Simple grid-stride / one-thread-per-
// column kernels with fp32 accumulation; unvalidated on a GPU (docs/kernels.md).
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>

#include "ops.h"

namespace lowrank_ops {
namespace cuda {


template <typename scalar_t>
__global__ void row_epilogue_kernel(scalar_t* y, const scalar_t* src, const scalar_t* __restrict__ os,
                                    const scalar_t* __restrict__ b, int64_t n, int64_t cols) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t j = i % cols;
    acc_t v = static_cast<acc_t>(src[i]);
    if (os) v *= static_cast<acc_t>(os[j]);
    if (b) v += static_cast<acc_t>(b[j]);
    y[i] = static_cast<scalar_t>(v);
  }
}

// out[j] = Σ_t a[t, j]·b[t, j]; one thread per column, coalesced across a warp.
template <typename scalar_t>
__global__ void column_dot_kernel(const scalar_t* __restrict__ a, const scalar_t* __restrict__ b,
                                  scalar_t* __restrict__ out, int64_t rows, int64_t cols) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t j = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (j >= cols) return;
  acc_t acc = 0;
  for (int64_t r = 0; r < rows; ++r) acc += static_cast<acc_t>(a[r * cols + j]) * static_cast<acc_t>(b[r * cols + j]);
  out[j] = static_cast<scalar_t>(acc);
}

inline int blocks_for(int64_t n, int threads) {
  return static_cast<int>(std::min<int64_t>((n + threads - 1) / threads, 65535));
}

// dst = src ⊙ out_scale + bias row-wise (either optional); dst may be src.
inline void row_epilogue_cuda(at::Tensor& y, const at::Tensor& src, const OptTensor& out_scale, const OptTensor& bias) {
  if (!out_scale.has_value() && !bias.has_value()) {
    if (!y.is_same(src)) y.copy_(src);
    return;
  }
  TORCH_INTERNAL_ASSERT(y.is_contiguous() && src.is_contiguous() && y.sizes() == src.sizes());
  const int64_t n = y.numel(), cols = y.size(1);
  if (n == 0) return;
  const at::Tensor os = out_scale.has_value() ? out_scale->contiguous() : at::Tensor();
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "lowrank_linear_epilogue_cuda", [&] {
    constexpr int threads = 256;
    row_epilogue_kernel<scalar_t><<<blocks_for(n, threads), threads, 0, stream>>>(
        y.data_ptr<scalar_t>(), src.const_data_ptr<scalar_t>(), os.defined() ? os.const_data_ptr<scalar_t>() : nullptr,
        b.defined() ? b.const_data_ptr<scalar_t>() : nullptr, n, cols);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

inline at::Tensor column_dot_cuda(const at::Tensor& a_in, const at::Tensor& b_in) {
  const at::Tensor a = a_in.contiguous(), b = b_in.contiguous();
  const int64_t rows = a.size(0), cols = a.size(1);
  at::Tensor out = at::empty({cols}, a.options());
  if (cols == 0) return out;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.scalar_type(), "lowrank_column_dot_cuda", [&] {
    constexpr int threads = 256;
    column_dot_kernel<scalar_t><<<static_cast<unsigned>((cols + threads - 1) / threads), threads, 0, stream>>>(
        a.const_data_ptr<scalar_t>(), b.const_data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), rows, cols);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace cuda
}  // namespace lowrank_ops
