// Sparse fine-tuning: y = x (W + Delta)^T + bias with Delta held as k (index, value) entries.
// The dense parts (x W^T, dy W) go through ATen; these kernels are the sparse ones:
//   spmm  : y[n, r] += sum_{t in row r} v_t x[n, c_t]       (forward's x Delta^T)
//   spmm^T: y[n, c_t] += v_t x[n, r_t]                        (backward's dy Delta)
//   sddmm : dv[t] = sum_n dy[n, r_t] x[n, c_t]               (the masked weight gradient)
// Entries come as CSR by output row (csrc/ops builds it from the sorted flat indices and validates
// them), so every kernel can work row by row and read each dy column once per token tile. No
// kernel ever forms a dense out x in matrix.
#pragma once
#include <cstdint>

#include "kernels/common.h"

namespace peft_kernels {

struct SparseDeltaPattern {
  int64_t out = 0, in = 0;  // Delta is out x in
  int64_t nnz = 0;          // k entries, sorted row-major, unique
  const int64_t* row_ptr = nullptr;  // [out + 1]: entries of row r are [row_ptr[r], row_ptr[r+1])
  const int32_t* rows = nullptr;     // [nnz]: output row of each entry (redundant with row_ptr)
  const int32_t* cols = nullptr;     // [nnz]: input column of each entry
  // Column-major view, for the transposed product (set only where it is needed):
  const int64_t* col_ptr = nullptr;    // [in + 1]: entries of column c are
  const int32_t* col_order = nullptr;  // col_order[col_ptr[c] .. col_ptr[c+1]), by row
};

// spmm (transpose = false): y [N, out] += x [N, in] Delta^T.
// spmm (transpose = true):  y [N, in]  += x [N, out] Delta (uses col_ptr / col_order, so every
//                           y element is one gather-sum: no scatter, no atomics).
// y already holds the dense result (ATen's GEMM); the sparse sum is accumulated in the
// accumulation type (float64 for float64, float32 otherwise) and added to y once per element.
struct SparseDeltaMatmulParams {
  DType dtype = DType::kFloat32;  // of x, values and y
  SparseDeltaPattern pattern;
  int64_t N = 0;
  const void* values = nullptr;  // [nnz]
  const void* x = nullptr;       // [N, in] (or [N, out] with transpose), contiguous
  void* y = nullptr;             // [N, out] (or [N, in] with transpose), contiguous, updated
  bool transpose = false;
};

// dvalues[t] = sum_n dy[n, rows[t]] * x[n, cols[t]], accumulated in the accumulation type in a
// fixed order (the same bits on every run), written in dtype.
struct SparseDeltaGradParams {
  DType dtype = DType::kFloat32;  // of dy, x and dvalues
  SparseDeltaPattern pattern;
  int64_t N = 0;
  const void* dy = nullptr;  // [N, out], contiguous
  const void* x = nullptr;   // [N, in], contiguous
  void* dvalues = nullptr;   // [nnz]
};

// CPU: float32, float64.
void sparse_delta_matmul_cpu(const SparseDeltaMatmulParams& p);
void sparse_delta_grad_cpu(const SparseDeltaGradParams& p);

// CUDA: float32, float64, float16, bfloat16 (float32 accumulation for the half types).
// Deterministic: no floating-point atomics. `workspace` holds the matching *_workspace_bytes(p)
// bytes of device memory (may be null when that is 0).
void sparse_delta_matmul_cuda(const SparseDeltaMatmulParams& p, void* workspace,
                              cudaStream_t stream);
int64_t sparse_delta_matmul_cuda_workspace_bytes(const SparseDeltaMatmulParams& p);
void sparse_delta_grad_cuda(const SparseDeltaGradParams& p, void* workspace, cudaStream_t stream);
int64_t sparse_delta_grad_cuda_workspace_bytes(const SparseDeltaGradParams& p);

}  // namespace peft_kernels
