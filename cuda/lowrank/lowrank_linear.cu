// CUDA kernels of lowrank_linear.  Products go through cuBLAS via ATen (base
// GEMM straight into the output, rank-r term accumulated with beta = 1); the
// out_scale/bias epilogue and the out_scale gradient are simple elementwise /
// column-reduction kernels below.  Fusing the rank-r term into a CUTLASS
// epilogue is left for a session with a GPU to validate and time it
// (docs/kernels.md marks these kernels unvalidated until then).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "lowrank/lowrank_common.h"

namespace lowrank_ops {
namespace {

template <typename scalar_t>
__global__ void row_epilogue_kernel(scalar_t* __restrict__ y, const scalar_t* __restrict__ os,
                                    const scalar_t* __restrict__ b, int64_t n, int64_t cols) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t j = i % cols;
    acc_t v = static_cast<acc_t>(y[i]);
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

int blocks_for(int64_t n, int threads) {
  return static_cast<int>(std::min<int64_t>((n + threads - 1) / threads, 65535));
}

void row_epilogue_cuda(at::Tensor& y, const OptTensor& out_scale, const OptTensor& bias) {
  if (!out_scale.has_value() && !bias.has_value()) return;
  TORCH_INTERNAL_ASSERT(y.is_contiguous());
  const int64_t n = y.numel(), cols = y.size(1);
  if (n == 0) return;
  const at::Tensor os = out_scale.has_value() ? out_scale->contiguous() : at::Tensor();
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "lowrank_linear_epilogue_cuda", [&] {
    constexpr int threads = 256;
    row_epilogue_kernel<scalar_t><<<blocks_for(n, threads), threads, 0, stream>>>(
        y.data_ptr<scalar_t>(), os.defined() ? os.const_data_ptr<scalar_t>() : nullptr,
        b.defined() ? b.const_data_ptr<scalar_t>() : nullptr, n, cols);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

at::Tensor column_dot_cuda(const at::Tensor& a_in, const at::Tensor& b_in) {
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

}  // namespace

at::Tensor lowrank_linear_cuda(const at::Tensor& x, const OptTensor& weight, const OptTensor& bias,
                               const at::Tensor& down, const at::Tensor& up, const OptTensor& core, double scale,
                               const OptTensor& out_scale) {
  const c10::cuda::CUDAGuard guard(x.device());
  return detail::lowrank_linear_impl(x, weight, bias, down, up, core, scale, out_scale, &row_epilogue_cuda);
}

Grads7 lowrank_linear_backward_cuda(const at::Tensor& grad, const at::Tensor& x, const OptTensor& weight,
                                    const at::Tensor& down, const at::Tensor& up, const OptTensor& core,
                                    double scale, const OptTensor& out_scale, std::array<bool, 7> output_mask) {
  const c10::cuda::CUDAGuard guard(x.device());
  return detail::lowrank_linear_backward_impl(grad, x, weight, down, up, core, scale, out_scale, output_mask,
                                              &column_dot_cuda);
}

}  // namespace lowrank_ops

TORCH_LIBRARY_IMPL(lowrank_ops, CUDA, m) {
  m.impl("lowrank_linear", &lowrank_ops::lowrank_linear_cuda);
  m.impl("lowrank_linear_backward", &lowrank_ops::lowrank_linear_backward_cuda);
}
