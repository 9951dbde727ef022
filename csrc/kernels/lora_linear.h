// Fused low-rank adapter matmul: y = x W^T + bias + s * act(drop(x) A^T) B^T.
// The big GEMMs (x W^T, dy W) go through ATen; on the CPU these three kernels are the adapter
// branch (on CUDA, cuBLAS and lora_dropout_cuda below):
//   shrink : pre = drop(x) A^T                       (dropout fused: no dropped copy of x)
//   dy pass: g = dy B,  dB = dy^T a,  dbias = sum dy  (one read of dy for all rank-r reductions)
//   x pass : dA = dpre^T drop(x),  dx = mask * (dpre A) (one read of x, mask regenerated)
// Rank-r tensors (pre, a, g, dpre) and the reduction outputs (dA, dB, dbias) are in the
// accumulation type: float64 for float64 inputs, float32 otherwise.
#pragma once
#include "kernels/common.h"

namespace peft_kernels {

struct LoraShrinkParams {
  const void* x = nullptr;  // [N, in], dtype, contiguous
  const void* A = nullptr;  // [r, in], dtype, contiguous
  void* pre = nullptr;      // [N, r], accumulation type, contiguous (written)
  int64_t N = 0, in = 0, r = 0;
  DType dtype = DType::kFloat32;
  DropoutParams dropout;
};

struct LoraDyPassParams {
  const void* dy = nullptr;  // [N, out], dtype, contiguous
  const void* B = nullptr;   // [out, r], dtype, contiguous
  const void* a = nullptr;   // [N, r], accumulation type: s * act(pre)
  void* g = nullptr;         // [N, r], accumulation type: dy B (written)
  void* dB = nullptr;        // [out, r], accumulation type: dy^T a (written)
  void* dbias = nullptr;     // [out], accumulation type: column sums of dy; nullptr = not needed
  int64_t N = 0, out = 0, r = 0;
  DType dtype = DType::kFloat32;
  // LoRA without dropout (identity activation): with x set, a is not read but formed block by
  // block as s x A^T from the rows of x beside those of dy, g is not written, and the same
  // blocks give dA = s g^T x. The forward then need not keep pre, and x is read once.
  const void* x = nullptr;  // [N, in], dtype, contiguous
  const void* A = nullptr;  // [r, in], dtype, contiguous
  void* dA = nullptr;       // [r, in], accumulation type (written)
  int64_t in = 0;
  double scaling = 1.0;
};

struct LoraXPassParams {
  const void* x = nullptr;     // [N, in], dtype, contiguous
  const void* A = nullptr;     // [r, in], dtype, contiguous
  const void* dpre = nullptr;  // [N, r], accumulation type
  void* dA = nullptr;          // [r, in], accumulation type (written)
  void* dx = nullptr;          // [N, in], dtype: mask * scale * (dpre A); nullptr = not needed
  int64_t N = 0, in = 0, r = 0;
  DType dtype = DType::kFloat32;
  DropoutParams dropout;
};

// y = bias + a B^T with a = s * act(pre) (CPU; CUDA uses cuBLAS for this GEMM).
struct LoraExpandParams {
  const void* a = nullptr;     // [N, r], dtype
  const void* B = nullptr;     // [out, r], dtype, contiguous
  const void* bias = nullptr;  // [out], dtype, or nullptr
  void* y = nullptr;           // [N, out], dtype (written)
  int64_t N = 0, out = 0, r = 0;
  DType dtype = DType::kFloat32;
};

// CPU: float32 and float64.
void lora_shrink_cpu(const LoraShrinkParams& p);
void lora_dy_pass_cpu(const LoraDyPassParams& p);
void lora_x_pass_cpu(const LoraXPassParams& p);
void lora_expand_cpu(const LoraExpandParams& p);

// CUDA runs every product through cuBLAS (csrc/ops/lora_linear.cpp); its kernel is the dropout
// mask: dst = keep(row0 + i, j) ? src : 0 over a [rows, cols] block of rows, the same mask as the
// CPU kernels (the 1 / (1 - p) scale is applied by the caller). dst may alias src. float32,
// float64, float16, bfloat16.
struct LoraDropoutParams {
  const void* src = nullptr;  // [rows, cols], dtype, contiguous
  void* dst = nullptr;        // [rows, cols], dtype, contiguous (written)
  int64_t rows = 0, cols = 0;
  int64_t row0 = 0;  // global row index of the block's first row (the mask's row coordinate)
  DType dtype = DType::kFloat32;
  DropoutParams dropout;  // seed and threshold (scale unused)
};
void lora_dropout_cuda(const LoraDropoutParams& p, cudaStream_t stream);

// The [hi, lo] rank operand of the half-type products (csrc/ops/lora_linear.cpp says why), one
// launch: dst [rows, 2r] = [rn(scale * src), rn(scale * src - hi)] for float32 src [rows, r].
struct LoraRankPairParams {
  const void* src = nullptr;  // [rows, r], float32, contiguous
  void* dst = nullptr;        // [rows, 2r], dtype (float16 or bfloat16), contiguous (written)
  int64_t rows = 0, r = 0;
  double scale = 1.0;
  DType dtype = DType::kBFloat16;
};
void lora_rank_pair_cuda(const LoraRankPairParams& p, cudaStream_t stream);

}  // namespace peft_kernels
