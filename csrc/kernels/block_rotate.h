// Block-diagonal rotation of activations, the hot path of the orthogonal adapters:
//   rotate:  y[n, blk] = R_blk x[n, blk]   (or R_blk^T x[n, blk]),  x, y [rows, k*b], R [k, b, b]
//   outer:   G_blk = sum_n a[n, blk] c[n, blk]^T                     (the gradient of R)
// Both are O(rows * k * b^2): a dense in x in rotation or a per-block batched GEMM through
// ATen costs 30-60x more here (measured: 198 ms for einsum vs 6 ms for the row kernel on one core,
// N = 12608, 768 features, b = 8).
#pragma once
#include <cstdint>

#include "kernels/common.h"

namespace peft_kernels {

struct BlockRotateParams {
  DType dtype = DType::kFloat32;  // of x, rotations and y
  int64_t rows = 0;
  int64_t blocks = 0;  // k
  int64_t block_size = 0;  // b
  const void* x = nullptr;          // [rows, k*b] contiguous
  const void* rotations = nullptr;  // [k, b, b] contiguous
  bool transpose = false;           // apply R^T instead of R
  void* y = nullptr;                // [rows, k*b]
};

struct BlockOuterParams {
  DType dtype = DType::kFloat32;  // of a, c and out
  int64_t rows = 0;
  int64_t blocks = 0;
  int64_t block_size = 0;
  const void* a = nullptr;  // [rows, k*b]
  const void* c = nullptr;  // [rows, k*b]
  void* out = nullptr;      // [k, b, b]: sum over rows of a_blk c_blk^T, accumulated in float32
                            // (float64 for float64) and written in dtype
};

void block_rotate_cpu(const BlockRotateParams& p);
void block_outer_cpu(const BlockOuterParams& p);
void block_rotate_cuda(const BlockRotateParams& p, cudaStream_t stream);
// workspace: block_outer_cuda_workspace_bytes(p) bytes of device memory (may be null when 0).
void block_outer_cuda(const BlockOuterParams& p, void* workspace, cudaStream_t stream);
int64_t block_outer_cuda_workspace_bytes(const BlockOuterParams& p);

}  // namespace peft_kernels
