// Fused low-rank adapter matmul: y = x W^T + bias + s * act(drop(x) A^T) B^T.
// The big GEMMs (x W^T, dy W) go through ATen; these three kernels are the adapter branch:
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
  void* dB = nullptr;        // [out, r], accumulation type: dy^T a (written; CUDA: zero on entry)
  void* dbias = nullptr;     // [out], accumulation type: column sums of dy; nullptr = not needed
  int64_t N = 0, out = 0, r = 0;
  DType dtype = DType::kFloat32;
  bool deterministic = false;  // CUDA: no atomics (two passes over dy)
};

struct LoraXPassParams {
  const void* x = nullptr;     // [N, in], dtype, contiguous
  const void* A = nullptr;     // [r, in], dtype, contiguous
  const void* dpre = nullptr;  // [N, r], accumulation type
  void* dA = nullptr;          // [r, in], accumulation type (written; CUDA: zero on entry)
  void* dx = nullptr;          // [N, in], dtype: mask * scale * (dpre A); nullptr = not needed
  int64_t N = 0, in = 0, r = 0;
  DType dtype = DType::kFloat32;
  DropoutParams dropout;
  bool deterministic = false;  // CUDA: no atomics
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

// CUDA: float32, float64, float16, bfloat16 (float32 accumulation for the half types).
void lora_shrink_cuda(const LoraShrinkParams& p, cudaStream_t stream);
void lora_dy_pass_cuda(const LoraDyPassParams& p, cudaStream_t stream);
void lora_x_pass_cuda(const LoraXPassParams& p, cudaStream_t stream);

}  // namespace peft_kernels
