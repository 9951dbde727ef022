#pragma once
#include <ATen/core/Tensor.h>

#include <tuple>

namespace peft_kernels {

// W_eff = W * exp(s * B A) (first_order: W * (1 + s * B A)), shaped like weight [out, ...];
// A [r, K], B [out, r] with K = weight.numel() / out.
at::Tensor lie_weight_fwd(const at::Tensor& weight, const at::Tensor& A, const at::Tensor& B,
                          double scaling, bool first_order);

// (dA, dB) for the gradient `grad` with respect to W_eff (weight's shape).
std::tuple<at::Tensor, at::Tensor> lie_weight_bwd(const at::Tensor& grad, const at::Tensor& weight,
                                                  const at::Tensor& A, const at::Tensor& B,
                                                  double scaling, bool first_order);

// y = x W_eff^T + bias, W_eff formed for the product and dropped (not saved).
at::Tensor lie_linear_fwd(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& A,
                          const at::Tensor& B, const c10::optional<at::Tensor>& bias,
                          double scaling, bool first_order);

// (dx, dA, dB, dbias), computed over blocks of output rows: W_eff and the weight gradient exist
// one block at a time. A gradient not asked for is an empty [0] tensor.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lie_linear_bwd(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& A,
    const at::Tensor& B, double scaling, bool first_order, bool need_x, bool need_A, bool need_B,
    bool need_bias);

// The same for a 2-D convolution (weight [out, in / groups, kh, kw], zero padding).
at::Tensor lie_conv2d_fwd(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& A,
                          const at::Tensor& B, const c10::optional<at::Tensor>& bias,
                          at::IntArrayRef stride, at::IntArrayRef padding,
                          at::IntArrayRef dilation, int64_t groups, double scaling,
                          bool first_order);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lie_conv2d_bwd(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& A,
    const at::Tensor& B, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
    int64_t groups, double scaling, bool first_order, bool need_x, bool need_A, bool need_B,
    bool need_bias);

}  // namespace peft_kernels
