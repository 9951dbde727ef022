#pragma once
#include <ATen/core/Tensor.h>

#include <tuple>

namespace peft_kernels {

// y = x (W + Delta)^T + bias, Delta given by flat row-major `indices` (int64 or int32, sorted,
// unique, in [0, out * in)) and `values`.
at::Tensor sparse_delta_linear_fwd(const at::Tensor& x, const at::Tensor& weight,
                                   const at::Tensor& indices, const at::Tensor& values,
                                   const c10::optional<at::Tensor>& bias);

// Returns (dx, dvalues, dbias); a gradient that is not asked for is an empty [0] tensor.
// dvalues[t] = sum_n grad_out[n, row_t] x[n, col_t]: no dense out x in gradient is formed
// unless the density makes the dense GEMM the faster way (see ops/sparse_delta_linear.cpp).
std::tuple<at::Tensor, at::Tensor, at::Tensor> sparse_delta_linear_bwd(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& indices, const at::Tensor& values, bool need_x, bool need_values,
    bool need_bias);

}  // namespace peft_kernels
