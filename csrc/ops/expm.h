#pragma once
#include <ATen/core/Tensor.h>

namespace peft_kernels {

// exp of every square matrix of A [..., n, n].
at::Tensor expm_fwd(const at::Tensor& A);

// Gradient of sum(G * exp(A)) with respect to A: the adjoint Frechet derivative L(A^T, G).
at::Tensor expm_bwd(const at::Tensor& A, const at::Tensor& grad);

}  // namespace peft_kernels
