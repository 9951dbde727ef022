#pragma once
#include <ATen/core/Tensor.h>

#include <tuple>

namespace peft_kernels {

// Returns (y [..., out], pre [..., r]); pre = drop(x) A^T in the accumulation type, saved for
// backward (zeros where the backward forms it again: the CPU merged path, see
// csrc/ops/lora_linear.cpp). activation: 0 none (LoRA), 1 relu, 2 gelu (erf), 3 silu (parallel
// adapter).
std::tuple<at::Tensor, at::Tensor> lora_linear_fwd(const at::Tensor& x, const at::Tensor& weight,
                                                   const at::Tensor& lora_A,
                                                   const at::Tensor& lora_B,
                                                   const c10::optional<at::Tensor>& bias,
                                                   const c10::optional<at::Tensor>& seed,
                                                   double scaling, double dropout_p,
                                                   int64_t activation);

// Returns (dx, dA, dB, dbias); a gradient that is not asked for is an empty [0] tensor.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lora_linear_bwd(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& pre,
    const c10::optional<at::Tensor>& seed, double scaling, double dropout_p, int64_t activation,
    bool need_x, bool need_A, bool need_B, bool need_bias);

}  // namespace peft_kernels
