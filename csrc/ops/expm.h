#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

namespace peft_kernels {

// exp of every square matrix of A [..., n, n].
at::Tensor expm_fwd(const at::Tensor& A);

// Gradient of sum(G * exp(A)) with respect to A: the adjoint Frechet derivative L(A^T, G).
at::Tensor expm_bwd(const at::Tensor& A, const at::Tensor& grad);

// The batched-GEMM evaluation (exp, or with grad the gradient L(A^T, grad)) that expm_fwd /
// expm_bwd take for n >= 128 on both devices; callable directly at any n.
at::Tensor expm_batched(const at::Tensor& A, const c10::optional<at::Tensor>& grad);

}  // namespace peft_kernels
