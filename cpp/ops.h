// Declarations of every lowrank_ops kernel, one line per backend.
// Schemas live in registration.cpp; docs/ops.md documents the math.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>
#include <c10/util/string_view.h>
#include <array>
#include <tuple>

namespace lowrank_ops {

using OptTensor = std::optional<at::Tensor>;
using Grads7 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using Grads3 = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using Grads6 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// ---- lowrank family ---------------------------------------------------------
at::Tensor lowrank_linear_cpu(const at::Tensor& x, const OptTensor& weight, const OptTensor& bias,
                              const at::Tensor& down, const at::Tensor& up, const OptTensor& core,
                              double scale, const OptTensor& out_scale);
std::tuple<at::Tensor, at::Tensor> lowrank_linear_with_h_cpu(const at::Tensor& x, const OptTensor& weight,
    const OptTensor& bias, const at::Tensor& down, const at::Tensor& up, const OptTensor& core, double scale,
    const OptTensor& out_scale);
Grads7 lowrank_linear_backward_cpu(const at::Tensor& grad, const at::Tensor& x, const OptTensor& weight,
                                   const at::Tensor& down, const at::Tensor& up, const OptTensor& core,
                                   double scale, const OptTensor& out_scale, std::array<bool, 7> output_mask,
                                   const OptTensor& h);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dora_linear_cpu(const at::Tensor& x,
    const at::Tensor& weight, const OptTensor& bias, const at::Tensor& down, const at::Tensor& up,
    const at::Tensor& magnitude, double scale, const OptTensor& weight_norm_sq);
Grads6 dora_linear_backward_cpu(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& down, const at::Tensor& up, const at::Tensor& magnitude, double scale,
    const at::Tensor& pre_scale, const at::Tensor& norm, std::array<bool, 6> output_mask, const OptTensor& h);
at::Tensor dora_norm_cpu(const at::Tensor& weight, const at::Tensor& down, const at::Tensor& up, double scale,
                         const OptTensor& weight_norm_sq);
Grads3 dora_norm_backward_cpu(const at::Tensor& grad, const at::Tensor& norm, const at::Tensor& weight,
                              const at::Tensor& down, const at::Tensor& up, double scale,
                              std::array<bool, 3> output_mask);

#ifdef LOWRANK_OPS_WITH_CUDA
at::Tensor lowrank_linear_cuda(const at::Tensor& x, const OptTensor& weight, const OptTensor& bias,
                               const at::Tensor& down, const at::Tensor& up, const OptTensor& core,
                               double scale, const OptTensor& out_scale);
std::tuple<at::Tensor, at::Tensor> lowrank_linear_with_h_cuda(const at::Tensor& x, const OptTensor& weight,
    const OptTensor& bias, const at::Tensor& down, const at::Tensor& up, const OptTensor& core, double scale,
    const OptTensor& out_scale);
Grads7 lowrank_linear_backward_cuda(const at::Tensor& grad, const at::Tensor& x, const OptTensor& weight,
                                    const at::Tensor& down, const at::Tensor& up, const OptTensor& core,
                                    double scale, const OptTensor& out_scale, std::array<bool, 7> output_mask,
                                    const OptTensor& h);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dora_linear_cuda(const at::Tensor& x,
    const at::Tensor& weight, const OptTensor& bias, const at::Tensor& down, const at::Tensor& up,
    const at::Tensor& magnitude, double scale, const OptTensor& weight_norm_sq);
Grads6 dora_linear_backward_cuda(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& down, const at::Tensor& up, const at::Tensor& magnitude, double scale,
    const at::Tensor& pre_scale, const at::Tensor& norm, std::array<bool, 6> output_mask, const OptTensor& h);
at::Tensor dora_norm_cuda(const at::Tensor& weight, const at::Tensor& down, const at::Tensor& up, double scale,
                          const OptTensor& weight_norm_sq);
Grads3 dora_norm_backward_cuda(const at::Tensor& grad, const at::Tensor& norm, const at::Tensor& weight,
                               const at::Tensor& down, const at::Tensor& up, double scale,
                               std::array<bool, 3> output_mask);
#endif

// ---- linalg_update family (factored_svd, svd_update, svd_append) -----------
using SVDResult = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
SVDResult factored_svd_cpu(const at::Tensor& B, const at::Tensor& A, const OptTensor& weights,
                           std::optional<int64_t> rank);
SVDResult svd_update_cpu(const at::Tensor& U, const at::Tensor& S, const at::Tensor& Vh, const at::Tensor& P,
                         const at::Tensor& Q, int64_t rank);
SVDResult svd_append_cpu(const at::Tensor& U, const at::Tensor& S, const at::Tensor& Vh, const at::Tensor& C,
                         int64_t rank, int64_t dim);
SVDResult svd_append_sparse_cpu(const at::Tensor& U, const at::Tensor& S, const at::Tensor& Vh,
                                const at::Tensor& crow, const at::Tensor& col, const at::Tensor& val, int64_t rank,
                                int64_t dim);
#ifdef LOWRANK_OPS_WITH_CUDA
SVDResult factored_svd_cuda(const at::Tensor& B, const at::Tensor& A, const OptTensor& weights,
                            std::optional<int64_t> rank);
SVDResult svd_update_cuda(const at::Tensor& U, const at::Tensor& S, const at::Tensor& Vh, const at::Tensor& P,
                          const at::Tensor& Q, int64_t rank);
SVDResult svd_append_cuda(const at::Tensor& U, const at::Tensor& S, const at::Tensor& Vh, const at::Tensor& C,
                          int64_t rank, int64_t dim);
SVDResult svd_append_sparse_cuda(const at::Tensor& U, const at::Tensor& S, const at::Tensor& Vh,
                                 const at::Tensor& crow, const at::Tensor& col, const at::Tensor& val, int64_t rank,
                                 int64_t dim);
#endif
// ---- merge family ------------------------------------------------------------
at::Tensor magnitude_threshold_cpu(const at::Tensor& x, double density);
at::Tensor ties_merge_cpu(const at::Tensor& deltas, const at::Tensor& weights, double density,
                          c10::string_view sign_method, bool normalize);
at::Tensor dare_merge_cpu(const at::Tensor& deltas, const at::Tensor& weights, double density, int64_t seed,
                          c10::string_view consensus, c10::string_view sign_method, bool normalize);
at::Tensor nm_mask_cpu(const at::Tensor& x, int64_t n, int64_t m, const OptTensor& forbidden);
std::tuple<at::Tensor, at::Tensor, at::Tensor> sign_consensus_cpu(const at::Tensor& deltas, const OptTensor& weights,
                                                                  double eps, c10::string_view sign_method);
#ifdef LOWRANK_OPS_WITH_CUDA
at::Tensor magnitude_threshold_cuda(const at::Tensor& x, double density);
at::Tensor ties_merge_cuda(const at::Tensor& deltas, const at::Tensor& weights, double density,
                           c10::string_view sign_method, bool normalize);
at::Tensor dare_merge_cuda(const at::Tensor& deltas, const at::Tensor& weights, double density, int64_t seed,
                           c10::string_view consensus, c10::string_view sign_method, bool normalize);
at::Tensor nm_mask_cuda(const at::Tensor& x, int64_t n, int64_t m, const OptTensor& forbidden);
std::tuple<at::Tensor, at::Tensor, at::Tensor> sign_consensus_cuda(const at::Tensor& deltas, const OptTensor& weights,
                                                                   double eps, c10::string_view sign_method);
#endif
// ---- linalg family -----------------------------------------------------------
std::tuple<at::Tensor, at::Tensor, at::Tensor> rsvd_cpu(const at::Tensor& A, int64_t rank, int64_t oversample,
                                                        int64_t n_iter, int64_t seed);
std::tuple<at::Tensor, at::Tensor, at::Tensor> pivoted_qr_cpu(const at::Tensor& A, std::optional<int64_t> rank);
#ifdef LOWRANK_OPS_WITH_CUDA
std::tuple<at::Tensor, at::Tensor, at::Tensor> rsvd_cuda(const at::Tensor& A, int64_t rank, int64_t oversample,
                                                         int64_t n_iter, int64_t seed);
std::tuple<at::Tensor, at::Tensor, at::Tensor> pivoted_qr_cuda(const at::Tensor& A, std::optional<int64_t> rank);
#endif

}  // namespace lowrank_ops
