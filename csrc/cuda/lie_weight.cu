// CUDA kernels of the Lie-group Hadamard adapter (see kernels/lie_weight.h).
//
//   generate  lie_weight_kernel: out = W * exp(s * B A) (or W * (1 + s * B A))
//   grad      lie_weight_grad_kernel: M = G * W * exp(s * B A) (or G * W), dB = s * M A^T,
//             dA += s * B^T M
//
// Both run 256-thread blocks over tiles of kTileRows rows x TK columns; a thread owns rows
// ty + 8 i (i < 4) and columns tx + 32 c (c < TK / 32) of the tile (ty = warp, tx = lane), so
// every global access of a warp is one contiguous run of a row. The rank is walked in chunks of
// kRankChunk: the chunk's A columns [chunk, TK] and B rows (transposed, [chunk, kTileRows]) are
// staged in shared memory in the accumulation type, and D = B A is a register-tiled product
// (4 x TK / 32 outputs per thread, one broadcast B read and TK / 32 conflict-free A reads per
// rank step). When r <= kRankChunk, A's tile stays resident while a block walks its rows.
//
// grad forms M in registers and parks it in shared memory (never in global memory), then
//   dB  warp ty takes rank indices ty + 8 q (q < 4), lane = tile row: sums M[row, :] A[j, :]
//       over the tile's columns (M's rows padded: conflict-free), one atomicAdd per (row, j)
//       per tile
//   dA  same thread layout as D (rank index ty + 8 q instead of row): sums B[:, j] M[:, k] over
//       the tile's rows into registers that persist across the block's row tiles when
//       r <= 2 kRankChunk, so such a block issues one atomicAdd per (j, k) in total
// Atomics make the low bits of dA and dB depend on the order blocks finish in.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "cuda/elem.cuh"
#include "kernels/lie_weight.h"

namespace peft_kernels {
namespace {

using cu::AccT;
using cu::Elem;
using cu::madd;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kTileRows = 32;
constexpr int kRowsPerThread = kTileRows / kWarps;  // 4
constexpr int kRankChunk = 32;
constexpr int kRankPerWarp = kRankChunk / kWarps;  // 4 (dA and dB rank indices per thread)
constexpr int kBtStride = kTileRows + 1;           // padded: transposed stores stay conflict-free
constexpr int64_t kMaxGridY = 65535;
// Blocks per launch to aim for: enough to fill an H200 (132 SMs) a few times; beyond that a
// block walks more row tiles, which keeps A resident (generate) and amortizes dA's atomics (grad).
constexpr int64_t kGenerateTargetBlocks = 2048;
constexpr int64_t kGradTargetBlocks = 1024;

// Tile widths. grad also keeps M in shared memory, so float64 halves the width there to stay
// under the 48 KB of static shared memory; generate's float64 tile is halved too (at 128 columns
// its 16 double accumulators per thread took 128-138 registers on sm_90 and the first-order
// variant spilled).
template <typename T>
constexpr int kGenerateCols = sizeof(AccT<T>) == 8 ? 64 : 128;
template <typename T>
constexpr int kGradCols = sizeof(AccT<T>) == 8 ? 64 : 128;

__host__ __device__ __forceinline__ int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}
// Rank indices left in the chunk starting at j0.
__device__ __forceinline__ int chunk_size(int64_t r, int64_t j0) {
  return r - j0 < kRankChunk ? static_cast<int>(r - j0) : kRankChunk;
}

__device__ __forceinline__ float exp_acc(float v) { return expf(v); }
__device__ __forceinline__ double exp_acc(double v) { return exp(v); }

// A[j0 + j, k0 + c] -> as[j * TK + c] for j < kRankChunk, c < TK; zero past the chunk's rc
// rank indices and past column K. Consecutive threads read consecutive columns.
template <typename T, int TK>
__device__ __forceinline__ void stage_a(const T* __restrict__ A, int64_t K, int64_t j0, int rc,
                                        int64_t k0, int tid, AccT<T>* __restrict__ as) {
  using Acc = AccT<T>;
#pragma unroll 4
  for (int s = 0; s < kRankChunk * TK / kThreads; ++s) {
    const int u = tid + s * kThreads;
    const int j = u / TK, c = u % TK;
    const int64_t k = k0 + c;
    as[u] = (j < rc && k < K) ? Elem<T>::load(A[(j0 + j) * K + k]) : Acc(0);
  }
}

// B[row0 + o, j0 + j] -> bt[j * kBtStride + o]; zero past rc and past the last row. Reads run
// along B's rows; the padded stride spreads the transposed stores over the banks.
template <typename T>
__device__ __forceinline__ void stage_b(const T* __restrict__ B, int64_t rows, int64_t r,
                                        int64_t row0, int64_t j0, int rc, int tid,
                                        AccT<T>* __restrict__ bt) {
  using Acc = AccT<T>;
#pragma unroll
  for (int s = 0; s < kTileRows * kRankChunk / kThreads; ++s) {
    const int u = tid + s * kThreads;
    const int o = u / kRankChunk, j = u % kRankChunk;
    const int64_t row = row0 + o;
    bt[j * kBtStride + o] = (j < rc && row < rows) ? Elem<T>::load(B[row * r + j0 + j]) : Acc(0);
  }
}

// d[i][c] += sum_{j < rc} B[row i, j] A[j, col c] from the staged chunk.
template <typename Acc, int TK>
__device__ __forceinline__ void accumulate_d(const Acc* __restrict__ as,
                                             const Acc* __restrict__ bt, int rc, int ty, int tx,
                                             Acc (&d)[kRowsPerThread][TK / 32]) {
  constexpr int CN = TK / 32;
#pragma unroll 4
  for (int j = 0; j < rc; ++j) {
    Acc a[CN], b[kRowsPerThread];
#pragma unroll
    for (int c = 0; c < CN; ++c) a[c] = as[j * TK + tx + 32 * c];
#pragma unroll
    for (int i = 0; i < kRowsPerThread; ++i) b[i] = bt[j * kBtStride + ty + kWarps * i];
#pragma unroll
    for (int i = 0; i < kRowsPerThread; ++i) {
#pragma unroll
      for (int c = 0; c < CN; ++c) d[i][c] = madd(b[i], a[c], d[i][c]);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// generate. Block: column tile blockIdx.x, row tiles blockIdx.y, blockIdx.y + gridDim.y, ...
// W is read into registers before the rank loop so its latency hides behind the product.
template <typename T, int TK, bool kExact>
__global__ void __launch_bounds__(kThreads)
    lie_weight_kernel(const T* __restrict__ W, const T* __restrict__ A, const T* __restrict__ B,
                      T* __restrict__ out, int64_t rows, int64_t K, int64_t r, AccT<T> s) {
  using Acc = AccT<T>;
  constexpr int CN = TK / 32;
  __shared__ __align__(16) Acc as[kRankChunk * TK];
  __shared__ __align__(16) Acc bt[kRankChunk * kBtStride];

  const int tid = static_cast<int>(threadIdx.x);
  const int tx = tid % 32, ty = tid / 32;
  const int64_t k0 = static_cast<int64_t>(blockIdx.x) * TK;
  const int64_t row_tiles = ceil_div(rows, kTileRows);
  const bool a_resident = r <= kRankChunk;
  if (a_resident) stage_a<T, TK>(A, K, 0, static_cast<int>(r), k0, tid, as);

  for (int64_t tile = blockIdx.y; tile < row_tiles; tile += gridDim.y) {
    const int64_t row0 = tile * kTileRows;
    Acc w[kRowsPerThread][CN], d[kRowsPerThread][CN];
#pragma unroll
    for (int i = 0; i < kRowsPerThread; ++i) {
      const int64_t row = row0 + ty + kWarps * i;
#pragma unroll
      for (int c = 0; c < CN; ++c) {
        const int64_t k = k0 + tx + 32 * c;
        w[i][c] = (row < rows && k < K) ? Elem<T>::load(W[row * K + k]) : Acc(0);
        d[i][c] = Acc(0);
      }
    }
    for (int64_t j0 = 0; j0 < r; j0 += kRankChunk) {
      const int rc = chunk_size(r, j0);
      if (!a_resident) stage_a<T, TK>(A, K, j0, rc, k0, tid, as);
      stage_b<T>(B, rows, r, row0, j0, rc, tid, bt);
      __syncthreads();
      accumulate_d<Acc, TK>(as, bt, rc, ty, tx, d);
      __syncthreads();  // the next chunk or tile restages as / bt
    }
#pragma unroll
    for (int i = 0; i < kRowsPerThread; ++i) {
      const int64_t row = row0 + ty + kWarps * i;
#pragma unroll
      for (int c = 0; c < CN; ++c) {
        const int64_t k = k0 + tx + 32 * c;
        if (row < rows && k < K) {
          const Acc f = kExact ? exp_acc(s * d[i][c]) : madd(s, d[i][c], Acc(1));
          out[row * K + k] = Elem<T>::store(w[i][c] * f);
        }
      }
    }
  }
}

// da[q][c] += sum_{o < valid_rows} B[row o, j0 + ty + 8 q] M[o, col c]: B^T from the staged
// chunk (one address per warp), M along the tile row (consecutive per lane).
template <typename Acc, int TK>
__device__ __forceinline__ void accumulate_da(const Acc* __restrict__ ms,
                                              const Acc* __restrict__ bt, int valid_rows, int ty,
                                              int tx, Acc (&da)[kRankPerWarp][TK / 32]) {
  constexpr int CN = TK / 32;
  for (int o = 0; o < valid_rows; ++o) {
    Acc mv[CN], bv[kRankPerWarp];
#pragma unroll
    for (int c = 0; c < CN; ++c) mv[c] = ms[o * (TK + 1) + tx + 32 * c];
#pragma unroll
    for (int q = 0; q < kRankPerWarp; ++q) bv[q] = bt[(ty + kWarps * q) * kBtStride + o];
#pragma unroll
    for (int q = 0; q < kRankPerWarp; ++q) {
#pragma unroll
      for (int c = 0; c < CN; ++c) da[q][c] = madd(bv[q], mv[c], da[q][c]);
    }
  }
}

// dA[j0 + j, k0 + col c] += s * da[q][c] (j = ty + 8 q < rc), then da = 0.
template <typename Acc, int TK>
__device__ __forceinline__ void flush_da(Acc* __restrict__ dA, int64_t K, int64_t j0, int rc,
                                         int64_t k0, int ty, int tx, Acc s,
                                         Acc (&da)[kRankPerWarp][TK / 32]) {
#pragma unroll
  for (int q = 0; q < kRankPerWarp; ++q) {
    const int j = ty + kWarps * q;
#pragma unroll
    for (int c = 0; c < TK / 32; ++c) {
      const int64_t k = k0 + tx + 32 * c;
      if (j < rc && k < K) atomicAdd(dA + (j0 + j) * K + k, s * da[q][c]);
      da[q][c] = Acc(0);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// grad. Same tiling as generate; dA_out / dB_out are in the accumulation type. kChunks: 1 for
// r <= kRankChunk (A's tile resident), 2 for r <= 2 kRankChunk (A restaged per tile), both with
// the dA partials in registers until the block is done; 0 for any r, dA flushed per tile.
template <typename T, int TK, bool kExact, int kChunks>
__global__ void __launch_bounds__(kThreads)
    lie_weight_grad_kernel(const T* __restrict__ G, const T* __restrict__ W,
                           const T* __restrict__ A, const T* __restrict__ B,
                           AccT<T>* __restrict__ dA_out, AccT<T>* __restrict__ dB_out,
                           int64_t rows, int64_t K, int64_t r, AccT<T> s) {
  using Acc = AccT<T>;
  constexpr int CN = TK / 32;
  constexpr int kMStride = TK + 1;  // padded: the dB pass reads M down a column
  constexpr bool kAResident = kChunks == 1;
  __shared__ __align__(16) Acc as[kRankChunk * TK];
  __shared__ __align__(16) Acc bt[kRankChunk * kBtStride];
  __shared__ __align__(16) Acc ms[kTileRows * kMStride];

  const int tid = static_cast<int>(threadIdx.x);
  const int tx = tid % 32, ty = tid / 32;
  const int64_t k0 = static_cast<int64_t>(blockIdx.x) * TK;
  const int64_t row_tiles = ceil_div(rows, kTileRows);
  const int64_t chunks = kChunks > 0 ? kChunks : ceil_div(r, kRankChunk);
  if (kAResident) stage_a<T, TK>(A, K, 0, static_cast<int>(r), k0, tid, as);

  // dA partials of rank indices j0 + ty + 8 q, columns tx + 32 c; da1 holds chunk 1 when
  // kChunks == 2.
  Acc da0[kRankPerWarp][CN], da1[kRankPerWarp][CN];
#pragma unroll
  for (int q = 0; q < kRankPerWarp; ++q) {
#pragma unroll
    for (int c = 0; c < CN; ++c) da0[q][c] = da1[q][c] = Acc(0);
  }

  for (int64_t tile = blockIdx.y; tile < row_tiles; tile += gridDim.y) {
    const int64_t row0 = tile * kTileRows;
    // m starts as G * W (zero outside the matrix, so those elements add nothing below).
    Acc m[kRowsPerThread][CN], d[kRowsPerThread][CN];
#pragma unroll
    for (int i = 0; i < kRowsPerThread; ++i) {
      const int64_t row = row0 + ty + kWarps * i;
#pragma unroll
      for (int c = 0; c < CN; ++c) {
        const int64_t k = k0 + tx + 32 * c;
        const bool in = row < rows && k < K;
        m[i][c] = in ? Elem<T>::load(G[row * K + k]) * Elem<T>::load(W[row * K + k]) : Acc(0);
        d[i][c] = Acc(0);
      }
    }

    // Pass 1: D, then M. First order needs no D, only the last chunk staged for pass 2.
    for (int64_t ci = kExact ? 0 : chunks - 1; ci < chunks; ++ci) {
      const int64_t j0 = ci * kRankChunk;
      const int rc = chunk_size(r, j0);
      if (!kAResident) stage_a<T, TK>(A, K, j0, rc, k0, tid, as);
      stage_b<T>(B, rows, r, row0, j0, rc, tid, bt);
      __syncthreads();
      if (kExact) accumulate_d<Acc, TK>(as, bt, rc, ty, tx, d);
      if (ci + 1 < chunks) __syncthreads();  // ms is free: pass 2 of the last tile ended synced
    }
#pragma unroll
    for (int i = 0; i < kRowsPerThread; ++i) {
#pragma unroll
      for (int c = 0; c < CN; ++c) {
        if (kExact) m[i][c] *= exp_acc(s * d[i][c]);
        ms[(ty + kWarps * i) * kMStride + tx + 32 * c] = m[i][c];
      }
    }
    __syncthreads();

    // Pass 2: chunks in reverse, so the last one (still staged from pass 1) goes first.
    const int64_t row = row0 + tx;  // the dB pass: lane = tile row
    const int valid_rows = rows - row0 < kTileRows ? static_cast<int>(rows - row0) : kTileRows;
    for (int64_t ci = chunks - 1; ci >= 0; --ci) {
      const int64_t j0 = ci * kRankChunk;
      const int rc = chunk_size(r, j0);
      if (ci != chunks - 1) {
        stage_a<T, TK>(A, K, j0, rc, k0, tid, as);
        stage_b<T>(B, rows, r, row0, j0, rc, tid, bt);
        __syncthreads();
      }
      // dB[row, j0 + j] for j = ty + 8 q: M's row (column index varying across k) against A's
      // row j (the same address for the whole warp).
      Acc db[kRankPerWarp];
#pragma unroll
      for (int q = 0; q < kRankPerWarp; ++q) db[q] = Acc(0);
      const Acc* mrow = ms + tx * kMStride;
#pragma unroll 4
      for (int c = 0; c < TK; ++c) {
        const Acc mv = mrow[c];
#pragma unroll
        for (int q = 0; q < kRankPerWarp; ++q) {
          db[q] = madd(mv, as[(ty + kWarps * q) * TK + c], db[q]);
        }
      }
#pragma unroll
      for (int q = 0; q < kRankPerWarp; ++q) {
        const int j = ty + kWarps * q;
        if (j < rc && row < rows) atomicAdd(dB_out + row * r + j0 + j, s * db[q]);
      }
      if (kChunks == 2 && ci == 1) {
        accumulate_da<Acc, TK>(ms, bt, valid_rows, ty, tx, da1);
      } else {
        accumulate_da<Acc, TK>(ms, bt, valid_rows, ty, tx, da0);
        if (kChunks == 0) flush_da<Acc, TK>(dA_out, K, j0, rc, k0, ty, tx, s, da0);
      }
      __syncthreads();  // as / bt / ms are restaged next
    }
  }
  if (kChunks >= 1) flush_da<Acc, TK>(dA_out, K, 0, chunk_size(r, 0), k0, ty, tx, s, da0);
  if (kChunks == 2) {
    flush_da<Acc, TK>(dA_out, K, kRankChunk, chunk_size(r, kRankChunk), k0, ty, tx, s, da1);
  }
}

// ---------------------------------------------------------------------------------------------
// Column tiles in x, row tiles strided over y (capped: the kernels loop over the rest).
dim3 grid_for(int64_t rows, int64_t K, int tk, int64_t target_blocks) {
  const int64_t col_tiles = ceil_div(K, tk);
  const int64_t row_tiles = ceil_div(rows, kTileRows);
  const int64_t per_col = std::max<int64_t>(1, target_blocks / col_tiles);
  const int64_t y = std::min({row_tiles, per_col, kMaxGridY});
  return dim3(static_cast<unsigned>(col_tiles), static_cast<unsigned>(y));
}

template <typename T>
void launch(const LieWeightParams& p, cudaStream_t stream) {
  constexpr int TK = kGenerateCols<T>;
  const dim3 grid = grid_for(p.rows, p.K, TK, kGenerateTargetBlocks);
  const auto s = static_cast<AccT<T>>(p.scaling);
  const T* W = static_cast<const T*>(p.weight);
  const T* A = static_cast<const T*>(p.A);
  const T* B = static_cast<const T*>(p.B);
  T* out = static_cast<T*>(p.out);
  if (p.first_order) {
    lie_weight_kernel<T, TK, false><<<grid, kThreads, 0, stream>>>(W, A, B, out, p.rows, p.K,
                                                                    p.r, s);
  } else {
    lie_weight_kernel<T, TK, true><<<grid, kThreads, 0, stream>>>(W, A, B, out, p.rows, p.K,
                                                                   p.r, s);
  }
}

template <typename T, int TK, bool kExact>
void launch_grad_mode(const LieWeightGradParams& p, dim3 grid, cudaStream_t stream) {
  using Acc = AccT<T>;
  const auto s = static_cast<Acc>(p.scaling);
  const T* G = static_cast<const T*>(p.grad);
  const T* W = static_cast<const T*>(p.weight);
  const T* A = static_cast<const T*>(p.A);
  const T* B = static_cast<const T*>(p.B);
  Acc* dA = static_cast<Acc*>(p.dA);
  Acc* dB = static_cast<Acc*>(p.dB);
  if (p.r <= kRankChunk) {
    lie_weight_grad_kernel<T, TK, kExact, 1><<<grid, kThreads, 0, stream>>>(G, W, A, B, dA, dB,
                                                                            p.rows, p.K, p.r, s);
  } else if (p.r <= 2 * kRankChunk) {
    lie_weight_grad_kernel<T, TK, kExact, 2><<<grid, kThreads, 0, stream>>>(G, W, A, B, dA, dB,
                                                                            p.rows, p.K, p.r, s);
  } else {
    lie_weight_grad_kernel<T, TK, kExact, 0><<<grid, kThreads, 0, stream>>>(G, W, A, B, dA, dB,
                                                                            p.rows, p.K, p.r, s);
  }
}

template <typename T>
void launch_grad(const LieWeightGradParams& p, cudaStream_t stream) {
  constexpr int TK = kGradCols<T>;
  const dim3 grid = grid_for(p.rows, p.K, TK, kGradTargetBlocks);
  if (p.first_order) {
    launch_grad_mode<T, TK, false>(p, grid, stream);
  } else {
    launch_grad_mode<T, TK, true>(p, grid, stream);
  }
}

}  // namespace

void lie_weight_cuda(const LieWeightParams& p, cudaStream_t stream) {
  if (p.rows <= 0 || p.K <= 0) return;  // r = 0 still writes out = W
  switch (p.dtype) {
    case DType::kFloat32: launch<float>(p, stream); break;
    case DType::kFloat64: launch<double>(p, stream); break;
    case DType::kFloat16: launch<__half>(p, stream); break;
    case DType::kBFloat16: launch<__nv_bfloat16>(p, stream); break;
  }
}

void lie_weight_grad_cuda(const LieWeightGradParams& p, cudaStream_t stream) {
  if (p.rows <= 0 || p.K <= 0 || p.r <= 0) return;
  switch (p.dtype) {
    case DType::kFloat32: launch_grad<float>(p, stream); break;
    case DType::kFloat64: launch_grad<double>(p, stream); break;
    case DType::kFloat16: launch_grad<__half>(p, stream); break;
    case DType::kBFloat16: launch_grad<__nv_bfloat16>(p, stream); break;
  }
}

}  // namespace peft_kernels
