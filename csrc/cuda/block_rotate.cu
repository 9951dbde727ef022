// CUDA kernels of the block-diagonal rotation (see kernels/block_rotate.h).
//
//   rotate   block_rotate_kernel: y[n, blk] = M_blk x[n, blk], M = R or R^T
//   outer    block_outer_kernel: partial sums of a_blk c_blk^T per (column tile, row slice),
//            then block_outer_reduce_kernel adds the slices in order (no atomics: the result is
//            the same bits on every run)
//   b > 64   block_rotate_any_kernel / block_outer_any_kernel: one thread per output element,
//            operands read straight from global memory (correct for any b, not tuned)
//
// The tile kernels run 256-thread blocks over tiles of kTileRows rows x tc features, tc the
// largest multiple of b that is <= 64, so a tile holds whole blocks. Tiles are staged in shared
// memory in the accumulation type (16-byte vector loads when the rows allow), from where every
// thread reads the b features of its block. Compile-time block sizes (2, 4, ..., 64) unroll
// fully and read shared memory as vectors; other b <= 64 run the same kernels with a runtime b
// bounded by MAXB.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>

#include "cuda/elem.cuh"
#include "kernels/block_rotate.h"

namespace peft_kernels {
namespace {

constexpr int kThreads = 256;
constexpr int kTileCols = 64;  // widest tile; also the row stride of the staged tiles
constexpr int kTileRows = 32;
constexpr int kRowLanes = kThreads / kTileCols;  // rotate: thread = (tile column, row lane)
constexpr int kMaxTiledB = kTileCols;
// Enough blocks to fill a large GPU (132 SMs x 8 resident blocks ~ 1024) a couple of times.
constexpr int64_t kRotateTargetBlocks = 2048;
constexpr int64_t kOuterTargetBlocks = 1024;
constexpr int64_t kMaxGridY = 65535;
// outer's row slices: at least this many rows each (and 8 b), so the partial buffer's traffic
// stays a small fraction of the inputs'; at most this many slices and partial elements.
constexpr int64_t kMinSliceRows = 128;
constexpr int64_t kMaxSlices = 1024;
constexpr int64_t kMaxPartialElems = int64_t{1} << 24;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
__host__ __device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
__host__ __device__ __forceinline__ int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

// Tile width for block size b <= 64: whole blocks only.
__host__ __device__ __forceinline__ int tile_cols(int b) { return b * (kTileCols / b); }

// ---------------------------------------------------------------------------------------------
// Element types and fused multiply-add: cuda/elem.cuh.
using cu::AccT;
using cu::Elem;
using cu::madd;


bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// C consecutive shared-memory values; s is aligned to the vector used (C elements).
template <int C, typename Acc>
__device__ __forceinline__ void lds(Acc (&d)[C], const Acc* s) {
  if constexpr (sizeof(Acc) == 4 && C % 4 == 0) {
#pragma unroll
    for (int i = 0; i < C; i += 4) {
      const float4 q = *reinterpret_cast<const float4*>(s + i);
      d[i] = q.x;
      d[i + 1] = q.y;
      d[i + 2] = q.z;
      d[i + 3] = q.w;
    }
  } else if constexpr (sizeof(Acc) == 4 && C % 2 == 0) {
#pragma unroll
    for (int i = 0; i < C; i += 2) {
      const float2 q = *reinterpret_cast<const float2*>(s + i);
      d[i] = q.x;
      d[i + 1] = q.y;
    }
  } else if constexpr (sizeof(Acc) == 8 && C % 2 == 0) {
#pragma unroll
    for (int i = 0; i < C; i += 2) {
      const double2 q = *reinterpret_cast<const double2*>(s + i);
      d[i] = q.x;
      d[i + 1] = q.y;
    }
  } else {
#pragma unroll
    for (int i = 0; i < C; ++i) d[i] = s[i];
  }
}

// C values (a multiple of 16 bytes) to 16-byte-aligned shared memory.
template <int C, typename Acc>
__device__ __forceinline__ void sts(Acc* d, const Acc (&v)[C]) {
  static_assert(C * sizeof(Acc) % 16 == 0, "16-byte vectors");
#pragma unroll
  for (int i = 0; i < C; i += static_cast<int>(16 / sizeof(Acc))) {
    if constexpr (sizeof(Acc) == 4) {
      *reinterpret_cast<float4*>(d + i) = make_float4(v[i], v[i + 1], v[i + 2], v[i + 3]);
    } else {
      *reinterpret_cast<double2*>(d + i) = make_double2(v[i], v[i + 1]);
    }
  }
}

// Stages rows [row0, row0 + kTileRows) x columns [col0, col0 + cols) of the row-major T matrix
// src (leading dimension ld) into dst[r * kTileCols + c] in the accumulation type. Rows at or
// past row_end are zero (a partial last tile adds nothing to outer's sums). With `vec` (src
// 16-byte aligned, ld and cols multiples of the vector) every 16 bytes are one load; consecutive
// threads take consecutive pieces of a row either way, so the loads coalesce.
template <typename T>
__device__ __forceinline__ void stage_tile(const T* __restrict__ src, int64_t row0,
                                           int64_t row_end, int64_t col0, int cols, int64_t ld,
                                           bool vec, AccT<T>* __restrict__ dst) {
  using Acc = AccT<T>;
  const int tid = static_cast<int>(threadIdx.x);
  if (vec) {
    constexpr int V = static_cast<int>(16 / sizeof(T));
    constexpr int kSteps = (kTileRows * kTileCols / V + kThreads - 1) / kThreads;
    const int per_row = cols / V;
#pragma unroll
    for (int s = 0; s < kSteps; ++s) {
      const int u = tid + s * kThreads;
      const int r = u / per_row, cu = u - r * per_row;
      if (r >= kTileRows) break;
      const int64_t row = row0 + r;
      Acc v[V];
      if (row < row_end) {
        const uint4 q = *reinterpret_cast<const uint4*>(src + row * ld + col0 + cu * V);
        T e[V];
        memcpy(e, &q, sizeof(q));
#pragma unroll
        for (int t = 0; t < V; ++t) v[t] = Elem<T>::load(e[t]);
      } else {
#pragma unroll
        for (int t = 0; t < V; ++t) v[t] = Acc(0);
      }
      sts(dst + r * kTileCols + cu * V, v);
    }
  } else {
    const int n = kTileRows * cols;
    for (int u = tid; u < n; u += kThreads) {
      const int r = u / cols, c = u - r * cols;
      const int64_t row = row0 + r;
      dst[r * kTileCols + c] = row < row_end ? Elem<T>::load(src[row * ld + col0 + c]) : Acc(0);
    }
  }
}

// Chunk of a block row read as one shared-memory vector by the compile-time kernels.
template <int B>
constexpr int kChunk = B % 4 == 0 ? 4 : (B % 2 == 0 ? 2 : 1);

// ---------------------------------------------------------------------------------------------
// rotate. Block: column tile blockIdx.x (tc features), rows of stage group blockIdx.y
// (stages_per_block tiles of kTileRows rows). Thread: tile column cl = tid % 64 (feature i of
// block blk), row lane tid / 64. It keeps row i of M_blk in registers for all its rows and, per
// row, reads x[n, blk] from the staged tile (a broadcast: the threads of a block read the same
// addresses), so each y element costs b FMAs and one coalesced store.
template <typename T, int MAXB, bool kExact>
__global__ void __launch_bounds__(kThreads)
    block_rotate_kernel(const T* __restrict__ x, const T* __restrict__ R, T* __restrict__ y,
                        int64_t rows, int64_t ld, int b_arg, bool transpose, bool vec,
                        int64_t stages_per_block) {
  using Acc = AccT<T>;
  static_assert(MAXB >= 1 && MAXB <= kMaxTiledB, "block size");
  __shared__ __align__(16) Acc xs[kTileRows * kTileCols];

  const int b = kExact ? MAXB : b_arg;
  const int tc = tile_cols(b);
  const int64_t col0 = static_cast<int64_t>(blockIdx.x) * tc;
  const int cols = static_cast<int>(ld - col0 < tc ? ld - col0 : tc);
  const int tid = static_cast<int>(threadIdx.x);
  const int cl = tid % kTileCols, rl = tid / kTileCols;
  const bool active = cl < cols;
  const int first = cl - cl % b;  // tile column of feature 0 of this thread's block
  const int i = cl - first;

  // m[j] = M_blk[i][j]: R_blk[i][j], or R_blk[j][i] for the transpose.
  Acc m[MAXB];
  const T* rb = R + (active ? (col0 + cl) / b : 0) * b * b;
#pragma unroll
  for (int j = 0; j < MAXB; ++j) {
    m[j] = (active && (kExact || j < b)) ? Elem<T>::load(transpose ? rb[j * b + i] : rb[i * b + j])
                                         : Acc(0);
  }

  const int64_t row_begin = static_cast<int64_t>(blockIdx.y) * stages_per_block * kTileRows;
  const int64_t row_end = min64(rows, row_begin + stages_per_block * kTileRows);
  for (int64_t row0 = row_begin; row0 < row_end; row0 += kTileRows) {
    stage_tile(x, row0, row_end, col0, cols, ld, vec, xs);
    __syncthreads();
    if (active) {
#pragma unroll
      for (int q = 0; q < kTileRows / kRowLanes; ++q) {
        const int r = rl + q * kRowLanes;
        const int64_t row = row0 + r;
        if (row >= row_end) break;
        const Acc* xr = xs + r * kTileCols + first;
        Acc acc = Acc(0);
        if constexpr (kExact) {
          constexpr int C = kChunk<MAXB>;
#pragma unroll
          for (int j0 = 0; j0 < MAXB; j0 += C) {
            Acc xv[C];
            lds(xv, xr + j0);
#pragma unroll
            for (int e = 0; e < C; ++e) acc = madd(m[j0 + e], xv[e], acc);
          }
        } else {
#pragma unroll
          for (int j = 0; j < MAXB; ++j) {
            if (j < b) acc = madd(m[j], xr[j], acc);
          }
        }
        y[row * ld + col0 + cl] = Elem<T>::store(acc);
      }
    }
    __syncthreads();  // the next stage overwrites the tile
  }
}

// ---------------------------------------------------------------------------------------------
// outer. Block: column tile blockIdx.x, row slice blockIdx.y. A tile's tc / b blocks have tc * b
// sums; a thread owns a strip of J = min(MAXB, 16) of them (block blk, row i, columns
// js * J ..), so a row costs it one a value, J c values and J FMAs. The tc * ceil(b / J) strips
// take fewer than 256 threads, so `groups` copies of them split the staged rows (group g: rows
// g, g + groups, ..) and are summed in group order at the end (deterministic). The slice's sums
// go to partial[blockIdx.y] (the accumulation type) or, with a single slice, straight to out.
template <typename T, int MAXB, bool kExact>
__global__ void __launch_bounds__(kThreads)
    block_outer_kernel(const T* __restrict__ a, const T* __restrict__ c,
                       AccT<T>* __restrict__ partial, T* __restrict__ out, int64_t rows,
                       int64_t ld, int b_arg, bool a_vec, bool c_vec, int64_t rows_per_slice) {
  using Acc = AccT<T>;
  static_assert(MAXB >= 1 && MAXB <= kMaxTiledB, "block size");
  constexpr int J = MAXB < 16 ? MAXB : 16;
  // The a and c tiles; afterwards the groups' partial strips ((groups - 1) * strips * J <=
  // (256 - strips) * 16 < 2 * kTileRows * kTileCols values).
  __shared__ __align__(16) Acc smem[2 * kTileRows * kTileCols];
  Acc* const as = smem;
  Acc* const cs = smem + kTileRows * kTileCols;

  const int b = kExact ? MAXB : b_arg;
  const int nj = (b + J - 1) / J;
  const int tc = tile_cols(b);
  const int strips = tc * nj;  // (tc / b) blocks x b rows x nj strips
  const int groups = kThreads / strips;
  const int64_t col0 = static_cast<int64_t>(blockIdx.x) * tc;
  const int cols = static_cast<int>(ld - col0 < tc ? ld - col0 : tc);
  const int tid = static_cast<int>(threadIdx.x);
  const int g = tid / strips, s = tid - g * strips;
  const int blk_local = s / (b * nj);
  const int i = (s / nj) % b, js = s % nj;
  const int a_col = blk_local * b + i, c_col = blk_local * b + js * J;
  const bool active = g < groups && blk_local * b < cols;
  const int jn = b - js * J < J ? b - js * J : J;  // columns in this strip

  Acc acc[J];
#pragma unroll
  for (int jj = 0; jj < J; ++jj) acc[jj] = Acc(0);

  const int64_t row_begin = static_cast<int64_t>(blockIdx.y) * rows_per_slice;
  const int64_t row_end = min64(rows, row_begin + rows_per_slice);
  for (int64_t row0 = row_begin; row0 < row_end; row0 += kTileRows) {
    stage_tile(a, row0, row_end, col0, cols, ld, a_vec, as);
    stage_tile(c, row0, row_end, col0, cols, ld, c_vec, cs);
    __syncthreads();
    if (active) {
#pragma unroll 4
      for (int r = g; r < kTileRows; r += groups) {
        const Acc av = as[r * kTileCols + a_col];
        const Acc* cr = cs + r * kTileCols + c_col;
        if constexpr (kExact) {
          constexpr int C = kChunk<J>;
#pragma unroll
          for (int j0 = 0; j0 < J; j0 += C) {
            Acc cv[C];
            lds(cv, cr + j0);
#pragma unroll
            for (int e = 0; e < C; ++e) acc[j0 + e] = madd(av, cv[e], acc[j0 + e]);
          }
        } else {
#pragma unroll
          for (int jj = 0; jj < J; ++jj) {
            if (jj < jn) acc[jj] = madd(av, cr[jj], acc[jj]);
          }
        }
      }
    }
    __syncthreads();  // the next stage (or the group sums) overwrites the tiles
  }

  if (groups > 1) {
    if (active && g > 0) {
#pragma unroll
      for (int jj = 0; jj < J; ++jj) smem[((g - 1) * J + jj) * strips + s] = acc[jj];
    }
    __syncthreads();
    if (active && g == 0) {
      for (int q = 0; q < groups - 1; ++q) {
#pragma unroll
        for (int jj = 0; jj < J; ++jj) acc[jj] += smem[(q * J + jj) * strips + s];
      }
    }
  }
  if (!active || g > 0) return;

  const int64_t blk = col0 / b + blk_local;
  const int64_t base = (blk * b + i) * b + js * J;
#pragma unroll
  for (int jj = 0; jj < J; ++jj) {
    if (!kExact && jj >= jn) break;
    if (out != nullptr) {
      out[base + jj] = Elem<T>::store(acc[jj]);
    } else {
      partial[static_cast<int64_t>(blockIdx.y) * ld * b + base + jj] = acc[jj];
    }
  }
}

// out[e] = sum over slices of partial[slice][e], in slice order. The sum is kept in double, as
// the CPU kernel adds its chunks (a few hundred adds per element at most: cheap even at 1/64 the
// float rate).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    block_outer_reduce_kernel(const AccT<T>* __restrict__ partial, T* __restrict__ out,
                              int64_t n, int64_t slices) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; e < n;
       e += stride) {
    double sum = 0.0;
#pragma unroll 8
    for (int64_t q = 0; q < slices; ++q) sum += static_cast<double>(partial[q * n + e]);
    out[e] = Elem<T>::store(static_cast<AccT<T>>(sum));
  }
}

// ---------------------------------------------------------------------------------------------
// Any block size (the launchers use these for b > 64 only).

// One thread per y element, grid-stride over rows * ld.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    block_rotate_any_kernel(const T* __restrict__ x, const T* __restrict__ R, T* __restrict__ y,
                            int64_t rows, int64_t ld, int64_t b, bool transpose) {
  using Acc = AccT<T>;
  const int64_t n = rows * ld;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; e < n;
       e += stride) {
    const int64_t row = e / ld, col = e - row * ld;
    const int64_t blk = col / b, i = col - blk * b;
    const T* xb = x + row * ld + blk * b;
    const T* rb = R + blk * b * b;
    // M[i][j] at rb[i * b + j] (stride 1 in j) or rb[j * b + i] (stride b).
    const T* mi = transpose ? rb + i : rb + i * b;
    const int64_t mj = transpose ? b : 1;
    Acc acc = Acc(0);
    for (int64_t j = 0; j < b; ++j) {
      acc = madd(Elem<T>::load(mi[j * mj]), Elem<T>::load(xb[j]), acc);
    }
    y[e] = Elem<T>::store(acc);
  }
}

// One thread per (row slice blockIdx.y, out element): consecutive threads take consecutive j, so
// the c reads coalesce and the a reads are broadcasts.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    block_outer_any_kernel(const T* __restrict__ a, const T* __restrict__ c,
                           AccT<T>* __restrict__ partial, T* __restrict__ out, int64_t rows,
                           int64_t ld, int64_t b, int64_t rows_per_slice) {
  using Acc = AccT<T>;
  const int64_t n = ld * b;
  const int64_t e = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (e >= n) return;
  const int64_t blk = e / (b * b), ij = e - blk * b * b;
  const int64_t i = ij / b, j = ij - i * b;
  const int64_t row_begin = static_cast<int64_t>(blockIdx.y) * rows_per_slice;
  const int64_t row_end = min64(rows, row_begin + rows_per_slice);
  const T* ap = a + blk * b + i;
  const T* cp = c + blk * b + j;
  Acc acc = Acc(0);
  for (int64_t row = row_begin; row < row_end; ++row) {
    acc = madd(Elem<T>::load(ap[row * ld]), Elem<T>::load(cp[row * ld]), acc);
  }
  if (out != nullptr) {
    out[e] = Elem<T>::store(acc);
  } else {
    partial[static_cast<int64_t>(blockIdx.y) * n + e] = acc;
  }
}

// ---------------------------------------------------------------------------------------------
// Launchers.

// Row slices of outer: a function of the shape only (never of the device or timing), so the
// summation order, hence the result, is the same on every run; the workspace size follows it.
struct OuterPlan {
  int64_t col_blocks = 0;  // grid.x
  int64_t rows_per_slice = 0;
  int64_t slices = 0;  // grid.y; > 1: partial sums in the workspace, then the reduction
};

OuterPlan outer_plan(const BlockOuterParams& p) {
  OuterPlan plan;
  const int64_t b = p.block_size, ld = p.blocks * b, elems = ld * b;
  plan.col_blocks = b <= kMaxTiledB ? ceil_div(ld, tile_cols(static_cast<int>(b)))
                                    : ceil_div(elems, kThreads);
  int64_t want = ceil_div(kOuterTargetBlocks, plan.col_blocks);
  want = min64(want, p.rows / max64(kMinSliceRows, 8 * b));
  want = min64(want, min64(kMaxSlices, kMaxPartialElems / elems));
  want = max64(want, 1);
  plan.rows_per_slice = ceil_div(ceil_div(p.rows, want), kTileRows) * kTileRows;
  plan.slices = ceil_div(p.rows, plan.rows_per_slice);
  return plan;
}

size_t acc_bytes(DType dtype) { return dtype == DType::kFloat64 ? sizeof(double) : sizeof(float); }

template <typename T, int MAXB, bool kExact>
void rotate_launch(const BlockRotateParams& p, cudaStream_t stream) {
  constexpr int V = static_cast<int>(16 / sizeof(T));
  const int b = static_cast<int>(p.block_size);
  const int tc = tile_cols(b);
  const int64_t ld = p.blocks * p.block_size;
  const int64_t col_tiles = ceil_div(ld, tc);
  const int64_t stages = ceil_div(p.rows, kTileRows);
  // Several stages per block amortise loading M's rows, as long as the grid stays large.
  const int64_t groups = min64(stages, max64(1, ceil_div(kRotateTargetBlocks, col_tiles)));
  const int64_t per_block = max64(ceil_div(stages, groups), ceil_div(stages, kMaxGridY));
  const bool vec = aligned16(p.x) && ld % V == 0 && tc % V == 0;
  const dim3 grid(static_cast<unsigned>(col_tiles),
                  static_cast<unsigned>(ceil_div(stages, per_block)));
  block_rotate_kernel<T, MAXB, kExact><<<grid, kThreads, 0, stream>>>(
      static_cast<const T*>(p.x), static_cast<const T*>(p.rotations), static_cast<T*>(p.y),
      p.rows, ld, b, p.transpose, vec, per_block);
}

template <typename T>
void rotate_any_launch(const BlockRotateParams& p, cudaStream_t stream) {
  const int64_t ld = p.blocks * p.block_size;
  const int64_t blocks = min64(ceil_div(p.rows * ld, kThreads), 65536);
  block_rotate_any_kernel<T><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      static_cast<const T*>(p.x), static_cast<const T*>(p.rotations), static_cast<T*>(p.y),
      p.rows, ld, p.block_size, p.transpose);
}

template <typename T>
void rotate_dispatch(const BlockRotateParams& p, cudaStream_t stream) {
  switch (p.block_size) {
    case 2: return rotate_launch<T, 2, true>(p, stream);
    case 4: return rotate_launch<T, 4, true>(p, stream);
    case 8: return rotate_launch<T, 8, true>(p, stream);
    case 16: return rotate_launch<T, 16, true>(p, stream);
    case 32: return rotate_launch<T, 32, true>(p, stream);
    case 64: return rotate_launch<T, 64, true>(p, stream);
    default: break;
  }
  if (p.block_size <= 8) return rotate_launch<T, 8, false>(p, stream);
  if (p.block_size <= 16) return rotate_launch<T, 16, false>(p, stream);
  if (p.block_size <= 32) return rotate_launch<T, 32, false>(p, stream);
  if (p.block_size <= 64) return rotate_launch<T, 64, false>(p, stream);
  rotate_any_launch<T>(p, stream);
}

template <typename T>
void outer_reduce(const OuterPlan& plan, const AccT<T>* partial, T* out, int64_t n,
                  cudaStream_t stream) {
  const int64_t blocks = min64(ceil_div(n, kThreads), 65536);
  block_outer_reduce_kernel<T><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      partial, out, n, plan.slices);
}

template <typename T, int MAXB, bool kExact>
void outer_launch(const BlockOuterParams& p, void* workspace, cudaStream_t stream) {
  using Acc = AccT<T>;
  constexpr int V = static_cast<int>(16 / sizeof(T));
  const OuterPlan plan = outer_plan(p);
  const int b = static_cast<int>(p.block_size);
  const int64_t ld = p.blocks * p.block_size;
  const bool split = plan.slices > 1;
  Acc* partial = split ? static_cast<Acc*>(workspace) : nullptr;
  T* out = static_cast<T*>(p.out);
  const bool shape_vec = ld % V == 0 && tile_cols(b) % V == 0;
  const dim3 grid(static_cast<unsigned>(plan.col_blocks), static_cast<unsigned>(plan.slices));
  block_outer_kernel<T, MAXB, kExact><<<grid, kThreads, 0, stream>>>(
      static_cast<const T*>(p.a), static_cast<const T*>(p.c), partial, split ? nullptr : out,
      p.rows, ld, b, shape_vec && aligned16(p.a), shape_vec && aligned16(p.c),
      plan.rows_per_slice);
  if (split) outer_reduce<T>(plan, partial, out, ld * p.block_size, stream);
}

template <typename T>
void outer_any_launch(const BlockOuterParams& p, void* workspace, cudaStream_t stream) {
  using Acc = AccT<T>;
  const OuterPlan plan = outer_plan(p);
  const int64_t ld = p.blocks * p.block_size;
  const bool split = plan.slices > 1;
  Acc* partial = split ? static_cast<Acc*>(workspace) : nullptr;
  T* out = static_cast<T*>(p.out);
  const dim3 grid(static_cast<unsigned>(plan.col_blocks), static_cast<unsigned>(plan.slices));
  block_outer_any_kernel<T><<<grid, kThreads, 0, stream>>>(
      static_cast<const T*>(p.a), static_cast<const T*>(p.c), partial, split ? nullptr : out,
      p.rows, ld, p.block_size, plan.rows_per_slice);
  if (split) outer_reduce<T>(plan, partial, out, ld * p.block_size, stream);
}

template <typename T>
void outer_dispatch(const BlockOuterParams& p, void* workspace, cudaStream_t stream) {
  switch (p.block_size) {
    case 2: return outer_launch<T, 2, true>(p, workspace, stream);
    case 4: return outer_launch<T, 4, true>(p, workspace, stream);
    case 8: return outer_launch<T, 8, true>(p, workspace, stream);
    case 16: return outer_launch<T, 16, true>(p, workspace, stream);
    case 32: return outer_launch<T, 32, true>(p, workspace, stream);
    case 64: return outer_launch<T, 64, true>(p, workspace, stream);
    default: break;
  }
  if (p.block_size <= 8) return outer_launch<T, 8, false>(p, workspace, stream);
  if (p.block_size <= 16) return outer_launch<T, 16, false>(p, workspace, stream);
  if (p.block_size <= 32) return outer_launch<T, 32, false>(p, workspace, stream);
  if (p.block_size <= 64) return outer_launch<T, 64, false>(p, workspace, stream);
  outer_any_launch<T>(p, workspace, stream);
}

}  // namespace

void block_rotate_cuda(const BlockRotateParams& p, cudaStream_t stream) {
  if (p.rows <= 0 || p.blocks <= 0 || p.block_size <= 0) return;
  switch (p.dtype) {
    case DType::kFloat32: rotate_dispatch<float>(p, stream); break;
    case DType::kFloat64: rotate_dispatch<double>(p, stream); break;
    case DType::kFloat16: rotate_dispatch<__half>(p, stream); break;
    case DType::kBFloat16: rotate_dispatch<__nv_bfloat16>(p, stream); break;
  }
}

int64_t block_outer_cuda_workspace_bytes(const BlockOuterParams& p) {
  if (p.rows <= 0 || p.blocks <= 0 || p.block_size <= 0) return 0;
  const OuterPlan plan = outer_plan(p);
  if (plan.slices <= 1) return 0;
  return plan.slices * p.blocks * p.block_size * p.block_size *
         static_cast<int64_t>(acc_bytes(p.dtype));
}

void block_outer_cuda(const BlockOuterParams& p, void* workspace, cudaStream_t stream) {
  // rows = 0 is the caller's (it returns zeros without calling).
  if (p.rows <= 0 || p.blocks <= 0 || p.block_size <= 0) return;
  switch (p.dtype) {
    case DType::kFloat32: outer_dispatch<float>(p, workspace, stream); break;
    case DType::kFloat64: outer_dispatch<double>(p, workspace, stream); break;
    case DType::kFloat16: outer_dispatch<__half>(p, workspace, stream); break;
    case DType::kBFloat16: outer_dispatch<__nv_bfloat16>(p, workspace, stream); break;
  }
}

}  // namespace peft_kernels
