#pragma once
#include <ATen/core/Tensor.h>

#include <string>
#include <tuple>

namespace peft_kernels {

// Top-k singular triplets of every matrix of A [..., m, n]: U [..., m, k], S [..., k] (descending,
// non-negative), Vh [..., k, n]. method: "jacobi" (exact) or "randomized" (Halko range finder with
// niter power iterations and oversample extra columns, then the exact method on the projection).
// Sign convention: in every column of U the entry of largest magnitude (the first such) is
// positive.
std::tuple<at::Tensor, at::Tensor, at::Tensor> truncated_svd(const at::Tensor& A, int64_t k,
                                                              int64_t niter, int64_t oversample,
                                                              const std::string& method);

// The kernels alone, on copies (for tests and benchmarks): the one-sided Jacobi sweeps over the
// columns X [batch, n, m] (returns A V, V's columns as rows, and each matrix's sweep count or
// status), and the orthonormalisation of the rows of Q [batch, l, m].
std::tuple<at::Tensor, at::Tensor, at::Tensor> jacobi_svd_columns(const at::Tensor& X);
at::Tensor orthonormalize_rows(const at::Tensor& Q);

}  // namespace peft_kernels
