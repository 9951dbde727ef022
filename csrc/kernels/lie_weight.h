// Lie-group Hadamard adapter (LieRA): the weight as an element of the group of nonzero tensors
// under the Hadamard product,
//   exact        W_eff = W * exp(s * B A)
//   first order  W_eff = W * (1 + s * B A)
// for W [out, K] (a Linear's [out, in], a Conv2d's [out, in/groups * kh * kw] flattened),
// A [r, K], B [out, r].
//
//   generate : W_eff row by row, D = s * B A formed one row at a time in registers/cache (no
//              out x K temporary besides W_eff itself)
//   grad     : given the gradient G with respect to W_eff for a block of rows,
//              M = G * W * exp(s * B A) (exact) or G * W (first order), and
//              dB = s * M A^T,  dA += s * B^T M
//              with M never stored: each row's M is reduced into dB and dA as it is formed.
// Reductions (dA, dB) are in the accumulation type: float64 for float64, float32 otherwise.
#pragma once
#include "kernels/common.h"

namespace peft_kernels {

struct LieWeightParams {
  const void* weight = nullptr;  // [rows, K], dtype, contiguous
  const void* A = nullptr;       // [r, K], dtype, contiguous
  const void* B = nullptr;       // [rows, r], dtype, contiguous
  void* out = nullptr;           // [rows, K], dtype (written)
  int64_t rows = 0, K = 0, r = 0;
  double scaling = 1.0;
  bool first_order = false;
  DType dtype = DType::kFloat32;
};

struct LieWeightGradParams {
  const void* grad = nullptr;    // [rows, K], dtype, contiguous: dL / dW_eff for these rows
  const void* weight = nullptr;  // [rows, K], dtype, contiguous
  const void* A = nullptr;       // [r, K], dtype, contiguous
  const void* B = nullptr;       // [rows, r], dtype, contiguous
  void* dA = nullptr;            // [r, K], accumulation type: += s * B^T M (CUDA: atomically)
  void* dB = nullptr;            // [rows, r], accumulation type (written; CUDA: zero on entry)
  int64_t rows = 0, K = 0, r = 0;
  double scaling = 1.0;
  bool first_order = false;
  DType dtype = DType::kFloat32;
};

// CPU: float32, float64. dA's row sums go through fixed row chunks added in order, so the result
// does not depend on the thread count.
void lie_weight_cpu(const LieWeightParams& p);
void lie_weight_grad_cpu(const LieWeightGradParams& p);

// CUDA: float32, float64, float16, bfloat16 (float32 accumulation for the half types).
void lie_weight_cuda(const LieWeightParams& p, cudaStream_t stream);
void lie_weight_grad_cuda(const LieWeightGradParams& p, cudaStream_t stream);

}  // namespace peft_kernels
