// CUDA kernels for the adapter branch of the fused low-rank linear (see kernels/lora_linear.h).
//
//   shrink                  lora_rows_kernel (P = drop(x), Q' = A^T)
//   dy pass                 lora_dy_kernel: g, dB and dbias from one read of dy, dB / dbias
//                           (and g when `out` is split across blocks) accumulated atomically
//   dy pass, deterministic  lora_rows_kernel (g) + lora_db_kernel (dB, dbias): no atomics
//   x pass                  lora_x_kernel: dA and dx from one read of x; dA atomic unless
//                           deterministic
//
// All are SIMT tile kernels with 256-thread blocks: operand tiles are staged in shared memory
// already converted to the accumulation type (dropout applied on the way in, one Philox call per
// 4 columns), and each thread accumulates a register tile from vectorised shared-memory reads.
// The rank dimension is processed in chunks of RC = 16, 32 or 64 (the smallest that covers r, so
// common ranks waste little work; a larger r takes several chunks). Shared-memory rows are padded
// by kPad elements: rows stay 16-byte aligned for vector accesses and consecutive rows start in
// different banks. Every kernel stays within the 48 KB of static shared memory, double included,
// so no launch attribute has to be set.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>

#include "cuda/elem.cuh"
#include "kernels/lora_linear.h"

namespace peft_kernels {
namespace {

constexpr int kThreads = 256;
constexpr int kPad = 4;
constexpr int kSmemLimit = 48 * 1024;
// Non-deterministic x pass: aim for about this many blocks; the rest of the rows are looped over
// inside a block, which divides the number of dA atomics by the same factor.
constexpr int64_t kXTargetBlocks = 1024;
// Non-deterministic dy pass: split `out` across blocks until there are about this many (its
// blocks are heavier: two products per dy tile).
constexpr int64_t kDyTargetBlocks = 512;
constexpr int64_t kMaxGridY = 65535;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

bool aligned_rows(const void* p, int64_t ld, size_t elem_bytes) {
  // 4-element groups can be loaded as one vector when every row start is 4-element aligned.
  return p != nullptr && ld % 4 == 0 &&
         reinterpret_cast<uintptr_t>(p) % (4 * elem_bytes) == 0;
}

// ---------------------------------------------------------------------------------------------
// Element types and fused multiply-add: cuda/elem.cuh.
using cu::AccT;
using cu::Elem;
using cu::madd;


// c[m][n] += a[m] * b[n]
template <int M, int N, typename Acc>
__device__ __forceinline__ void outer(Acc (&c)[M][N], const Acc (&a)[M], const Acc (&b)[N]) {
#pragma unroll
  for (int m = 0; m < M; ++m) {
#pragma unroll
    for (int n = 0; n < N; ++n) c[m][n] = madd(a[m], b[n], c[m][n]);
  }
}

template <int M, int N, typename Acc>
__device__ __forceinline__ void zero(Acc (&c)[M][N]) {
#pragma unroll
  for (int m = 0; m < M; ++m) {
#pragma unroll
    for (int n = 0; n < N; ++n) c[m][n] = Acc(0);
  }
}

// W consecutive shared-memory values; s must be aligned to the vector used (16 bytes for 4 floats
// or 2 doubles, 8 bytes for 2 floats), which the padded layouts and tile offsets guarantee.
template <int W, typename Acc>
__device__ __forceinline__ void lds(Acc (&d)[W], const Acc* s) {
  if constexpr (sizeof(Acc) == 4 && W % 4 == 0) {
#pragma unroll
    for (int i = 0; i < W; i += 4) {
      const float4 q = *reinterpret_cast<const float4*>(s + i);
      d[i] = q.x;
      d[i + 1] = q.y;
      d[i + 2] = q.z;
      d[i + 3] = q.w;
    }
  } else if constexpr (sizeof(Acc) == 4 && W % 2 == 0) {
#pragma unroll
    for (int i = 0; i < W; i += 2) {
      const float2 q = *reinterpret_cast<const float2*>(s + i);
      d[i] = q.x;
      d[i + 1] = q.y;
    }
  } else if constexpr (sizeof(Acc) == 8 && W % 2 == 0) {
#pragma unroll
    for (int i = 0; i < W; i += 2) {
      const double2 q = *reinterpret_cast<const double2*>(s + i);
      d[i] = q.x;
      d[i + 1] = q.y;
    }
  } else {
#pragma unroll
    for (int i = 0; i < W; ++i) d[i] = s[i];
  }
}

// Four values to 16-byte-aligned (float) / 32-byte-aligned (double) shared memory.
template <typename Acc>
__device__ __forceinline__ void sts4(Acc* d, const Acc (&v)[4]) {
  if constexpr (sizeof(Acc) == 4) {
    *reinterpret_cast<float4*>(d) = make_float4(v[0], v[1], v[2], v[3]);
  } else {
    reinterpret_cast<double2*>(d)[0] = make_double2(v[0], v[1]);
    reinterpret_cast<double2*>(d)[1] = make_double2(v[2], v[3]);
  }
}

// Up to four consecutive elements of global memory, converted, zero beyond `valid`. With `vec`
// (row starts 4-element aligned) a full group is one vector load.
template <typename T>
__device__ __forceinline__ void load4(const T* __restrict__ p, int valid, bool vec,
                                      AccT<T> (&v)[4]) {
  if (vec && valid >= 4) {
    if constexpr (sizeof(T) == 4) {
      const float4 q = __ldg(reinterpret_cast<const float4*>(p));
      v[0] = q.x;
      v[1] = q.y;
      v[2] = q.z;
      v[3] = q.w;
    } else if constexpr (sizeof(T) == 8) {
      const double2 q0 = __ldg(reinterpret_cast<const double2*>(p));
      const double2 q1 = __ldg(reinterpret_cast<const double2*>(p) + 1);
      v[0] = q0.x;
      v[1] = q0.y;
      v[2] = q1.x;
      v[3] = q1.y;
    } else {
      const uint2 q = __ldg(reinterpret_cast<const uint2*>(p));
      T h[4];
      memcpy(h, &q, sizeof(q));
#pragma unroll
      for (int e = 0; e < 4; ++e) v[e] = Elem<T>::load(h[e]);
    }
  } else {
#pragma unroll
    for (int e = 0; e < 4; ++e) v[e] = e < valid ? Elem<T>::load(p[e]) : AccT<T>(0);
  }
}

// Up to four consecutive elements to global memory, converted from the accumulation type.
template <typename T>
__device__ __forceinline__ void store4(T* __restrict__ p, int valid, bool vec,
                                       const AccT<T> (&v)[4]) {
  if (vec && valid >= 4) {
    if constexpr (sizeof(T) == 4) {
      *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
    } else if constexpr (sizeof(T) == 8) {
      reinterpret_cast<double2*>(p)[0] = make_double2(v[0], v[1]);
      reinterpret_cast<double2*>(p)[1] = make_double2(v[2], v[3]);
    } else {
      T h[4];
#pragma unroll
      for (int e = 0; e < 4; ++e) h[e] = Elem<T>::store(v[e]);
      uint2 q;
      memcpy(&q, h, sizeof(q));
      *reinterpret_cast<uint2*>(p) = q;
    }
  } else {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      if (e < valid) p[e] = Elem<T>::store(v[e]);
    }
  }
}

// Dropout of the 4-column group starting at `col` (a multiple of 4) of row `row`: one Philox call
// covers the group. Dropped values become exactly 0 (never x * 0 * scale, which is NaN for
// scale = inf at p = 1). Returns the keep mask, bit e for column col + e.
template <typename Acc>
__device__ __forceinline__ uint32_t dropout4(Acc (&v)[4], int64_t seed, uint32_t threshold,
                                             Acc scale, int64_t row, int64_t col) {
  const Philox4 bits = dropout_bits(seed, row, col >> 2);
  uint32_t keep = 0;
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    if (dropout_keep(bits.v[e], threshold)) {
      keep |= 1u << e;
      v[e] *= scale;
    } else {
      v[e] = Acc(0);
    }
  }
  return keep;
}

// Stages the [ROWS x COLS] tile at (row0, col0) of a row-major [nrows, ncols] T matrix into
// dst[c * (ROWS + kPad) + r] (transposed, accumulation type), zero outside the matrix, with
// dropout when threshold != 0. Work unit: 4 consecutive columns (one vector load, one Philox
// call). A warp takes 16 rows x 2 units: each row's 8 consecutive elements keep the global loads
// sector-efficient, and as the row stride ROWS + kPad is 4 (mod 8) words, unit g's stores land
// 16 * (g % 2) banks apart, so the 32 stores of a warp hit 32 distinct banks.
template <typename T, int ROWS, int COLS>
__device__ __forceinline__ void stage_transposed(const T* __restrict__ src, int64_t row0,
                                                 int64_t nrows, int64_t col0, int64_t ncols,
                                                 bool vec, int64_t seed, uint32_t threshold,
                                                 AccT<T> scale, AccT<T>* __restrict__ dst) {
  using Acc = AccT<T>;
  constexpr int kGroups = COLS / 4;
  constexpr int kUnits = ROWS * kGroups;
  static_assert(COLS % 8 == 0 && ROWS % 16 == 0, "tile shape");
#pragma unroll
  for (int s = 0; s < (kUnits + kThreads - 1) / kThreads; ++s) {
    const int u = static_cast<int>(threadIdx.x) + s * kThreads;
    if (kUnits % kThreads != 0 && u >= kUnits) break;
    const int lane = u & 31, w = u >> 5;
    const int r = (w / (kGroups / 2)) * 16 + (lane & 15);
    const int g = (w % (kGroups / 2)) * 2 + (lane >> 4);
    const int64_t row = row0 + r, col = col0 + 4 * g;
    Acc v[4] = {Acc(0), Acc(0), Acc(0), Acc(0)};
    if (row < nrows && col < ncols) {
      const int64_t rem = ncols - col;
      load4(src + row * ncols + col, rem >= 4 ? 4 : static_cast<int>(rem), vec, v);
      if (threshold != 0) dropout4(v, seed, threshold, scale, row, col);
    }
#pragma unroll
    for (int e = 0; e < 4; ++e) dst[(4 * g + e) * (ROWS + kPad) + r] = v[e];
  }
}

// Stages the [ROWS x COLS] tile at (row0, col0) of a row-major [nrows, ncols] matrix of S (T or
// the accumulation type) into dst[r * (COLS + kPad) + c], zero outside. Consecutive threads take
// consecutive columns: coalesced loads, conflict-free stores.
template <int ROWS, int COLS, typename S, typename Acc>
__device__ __forceinline__ void stage_rows(const S* __restrict__ src, int64_t row0, int64_t nrows,
                                           int64_t col0, int64_t ncols, Acc* __restrict__ dst) {
  static_assert((ROWS * COLS) % kThreads == 0, "tile shape");
#pragma unroll
  for (int s = 0; s < ROWS * COLS / kThreads; ++s) {
    const int u = static_cast<int>(threadIdx.x) + s * kThreads;
    const int r = u / COLS, c = u % COLS;
    const int64_t row = row0 + r, col = col0 + c;
    dst[r * (COLS + kPad) + c] =
        (row < nrows && col < ncols) ? Elem<S>::load(src[row * ncols + col]) : Acc(0);
  }
}

// Same as stage_rows for a T matrix whose column count is a multiple of 4 per unit: one vector
// load per 4 columns (used for dy rows in the deterministic dB kernel).
template <typename T, int ROWS, int COLS>
__device__ __forceinline__ void stage_rows4(const T* __restrict__ src, int64_t row0,
                                            int64_t nrows, int64_t col0, int64_t ncols, bool vec,
                                            AccT<T>* __restrict__ dst) {
  using Acc = AccT<T>;
  constexpr int kGroups = COLS / 4;
  static_assert(COLS % 4 == 0 && (ROWS * kGroups) % kThreads == 0, "tile shape");
#pragma unroll
  for (int s = 0; s < ROWS * kGroups / kThreads; ++s) {
    const int u = static_cast<int>(threadIdx.x) + s * kThreads;
    const int r = u / kGroups, g = u % kGroups;
    const int64_t row = row0 + r, col = col0 + 4 * g;
    Acc v[4] = {Acc(0), Acc(0), Acc(0), Acc(0)};
    if (row < nrows && col < ncols) {
      const int64_t rem = ncols - col;
      load4(src + row * ncols + col, rem >= 4 ? 4 : static_cast<int>(rem), vec, v);
    }
    sts4(dst + r * (COLS + kPad) + 4 * g, v);
  }
}

// ---------------------------------------------------------------------------------------------
// Row-block product C[n, k] = sum_j P[n, j] * Q'[j, k] over a long reduction dimension K:
//   shrink        : P = drop(x) [N, in],  Q' = A^T (A [r, in], kQFromA), C = pre
//   deterministic g: P = dy [N, out],     Q' = B [out, r],                 C = g
// Block: BM = 32 rows x one rank chunk RC (grid.y), looping over K in BK-wide stages. Small
// blocks keep the GPU busy at moderate N (N / 32 blocks); to keep register tiles large enough for
// the FMA : shared-load ratio anyway, the block's threads form KS groups that split every stage's
// BK columns (group q takes columns q*BK/KS..), and the KS partial tiles are summed in a fixed
// order at the end, so the result is deterministic. In a group, thread (ty, tx) owns rows
// ty*TM.. and ranks tx*TR.. .
template <typename T, int BM, int BK, int RC, int KS, int TR, bool kQFromA>
__global__ void __launch_bounds__(kThreads)
    lora_rows_kernel(const T* __restrict__ P, const T* __restrict__ Q, AccT<T>* __restrict__ C,
                     int64_t N, int64_t K, int64_t r, bool p_vec, bool q_vec,
                     const int64_t* __restrict__ seed_ptr, uint32_t threshold, AccT<T> scale) {
  using Acc = AccT<T>;
  constexpr int kGroupThreads = kThreads / KS;
  constexpr int kSlice = BK / KS;  // stage columns per group
  constexpr int TXN = RC / TR, TYN = kGroupThreads / TXN, TM = BM / TYN;
  constexpr int kRed = KS > 1 ? KS - 1 : 1;
  static_assert(KS * kSlice == BK && TXN * TR == RC && TXN * TYN == kGroupThreads &&
                    TM * TYN == BM,
                "thread layout");
  static_assert(sizeof(Acc) * (BK * (BM + kPad) + BK * (RC + kPad) + kRed * BM * RC) <=
                    kSmemLimit,
                "shared memory");
  __shared__ __align__(16) Acc ps[BK][BM + kPad];   // P tile, transposed: ps[j][n]
  __shared__ __align__(16) Acc qs[BK][RC + kPad];   // Q' tile: qs[j][k]
  __shared__ __align__(16) Acc red[kRed][BM][RC];  // partial tiles of groups 1..KS-1

  const int tid = static_cast<int>(threadIdx.x);
  const int grp = tid / kGroupThreads, lt = tid % kGroupThreads;
  const int tx = lt % TXN, ty = lt / TXN;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * BM;
  const int64_t k0 = static_cast<int64_t>(blockIdx.y) * RC;
  const int64_t seed = threshold != 0 ? *seed_ptr : 0;

  Acc acc[TM][TR];
  zero(acc);
  for (int64_t j0 = 0; j0 < K; j0 += BK) {
    stage_transposed<T, BM, BK>(P, row0, N, j0, K, p_vec, seed, threshold, scale, &ps[0][0]);
    if constexpr (kQFromA) {
      // A[k0 + k, j0 + j] -> qs[j][k]: the same transposing stager, rows = ranks.
      stage_transposed<T, RC, BK>(Q, k0, r, j0, K, q_vec, 0, 0u, Acc(1), &qs[0][0]);
    } else {
      stage_rows<BK, RC>(Q, j0, K, k0, r, &qs[0][0]);
    }
    __syncthreads();
#pragma unroll
    for (int jj = 0; jj < kSlice; ++jj) {
      const int j = grp * kSlice + jj;
      Acc pv[TM], qv[TR];
      lds(pv, &ps[j][ty * TM]);
      lds(qv, &qs[j][tx * TR]);
      outer(acc, pv, qv);
    }
    __syncthreads();  // the next stage overwrites the tiles
  }

  if constexpr (KS > 1) {
    if (grp > 0) {
#pragma unroll
      for (int m = 0; m < TM; ++m) {
#pragma unroll
        for (int j = 0; j < TR; ++j) red[grp - 1][ty * TM + m][tx * TR + j] = acc[m][j];
      }
    }
    __syncthreads();
    if (grp > 0) return;
#pragma unroll
    for (int q = 0; q < KS - 1; ++q) {
#pragma unroll
      for (int m = 0; m < TM; ++m) {
#pragma unroll
        for (int j = 0; j < TR; ++j) acc[m][j] += red[q][ty * TM + m][tx * TR + j];
      }
    }
  }

#pragma unroll
  for (int m = 0; m < TM; ++m) {
    const int64_t row = row0 + ty * TM + m;
    if (row >= N) continue;
#pragma unroll
    for (int j = 0; j < TR; ++j) {
      const int64_t k = k0 + tx * TR + j;
      if (k < r) C[row * r + k] = acc[m][j];
    }
  }
}

// ---------------------------------------------------------------------------------------------
// dy pass, non-deterministic: g = dy B, dB += dy^T a, dbias += colsum(dy), one read of dy.
//
// Block: BM rows x one rank chunk RC (grid.y) x a range of `out` (grid.z, `out_chunks_per_block`
// BO-wide steps). Per step the staged dy tile feeds both products:
//   g  [BM x RC] += dy_tile [BM x BO] . B_tile [BO x RC]  thread: rows ty*TM.., ranks tx*TR..
//   dB [BO x RC]  = dy_tile^T . a_rows [BM x RC]          thread: outs ty*TO.., ranks tx*TR..
// The dB / dbias partials of the block's rows are added atomically (the caller zeroes them). The
// `out` split gives enough blocks at moderate N; with more than one split, g partials are added
// atomically too (into a g zeroed by lora_zero_kernel), otherwise stored.
template <typename T, int BM, int BO, int RC, int TR>
__global__ void __launch_bounds__(kThreads)
    lora_dy_kernel(const T* __restrict__ dy, const T* __restrict__ B,
                   const AccT<T>* __restrict__ a, AccT<T>* __restrict__ g,
                   AccT<T>* __restrict__ dB, AccT<T>* __restrict__ dbias, int64_t N, int64_t out,
                   int64_t r, bool dy_vec, int64_t out_chunks_per_block, bool atomic_g) {
  using Acc = AccT<T>;
  constexpr int TXN = RC / TR, TYN = kThreads / TXN;
  constexpr int TM = BM / TYN, TO = BO / TYN;
  static_assert(TXN * TYN == kThreads && TM * TYN == BM && TO * TYN == BO && TO >= 1,
                "thread layout");
  static_assert(sizeof(Acc) * (BO * (BM + kPad) + BO * (RC + kPad) + BM * (RC + kPad)) <=
                    kSmemLimit,
                "shared memory");
  __shared__ __align__(16) Acc ds[BO][BM + kPad];  // dy tile, transposed: ds[o][n]
  __shared__ __align__(16) Acc bs[BO][RC + kPad];  // B tile: bs[o][k]
  __shared__ __align__(16) Acc as[BM][RC + kPad];  // a rows of this block: as[n][k]

  const int tid = static_cast<int>(threadIdx.x), tx = tid % TXN, ty = tid / TXN;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * BM;
  const int64_t k0 = static_cast<int64_t>(blockIdx.y) * RC;
  const int64_t o_begin = static_cast<int64_t>(blockIdx.z) * out_chunks_per_block * BO;
  const int64_t o_end = o_begin + out_chunks_per_block * BO < out
                            ? o_begin + out_chunks_per_block * BO
                            : out;
  const bool do_bias = dbias != nullptr && blockIdx.y == 0;

  // Visible after the first barrier of the loop below; never overwritten.
  stage_rows<BM, RC>(a, row0, N, k0, r, &as[0][0]);

  Acc gacc[TM][TR];
  zero(gacc);
  for (int64_t o0 = o_begin; o0 < o_end; o0 += BO) {
    stage_transposed<T, BM, BO>(dy, row0, N, o0, out, dy_vec, 0, 0u, Acc(1), &ds[0][0]);
#pragma unroll
    for (int s = 0; s < BO * RC / kThreads; ++s) {
      const int u = tid + s * kThreads, o = u / RC, k = u % RC;
      const int64_t oo = o0 + o, kk = k0 + k;
      bs[o][k] = (oo < out && kk < r) ? Elem<T>::load(B[oo * r + kk]) : Acc(0);
    }
    __syncthreads();

#pragma unroll
    for (int o = 0; o < BO; ++o) {
      Acc dv[TM], bv[TR];
      lds(dv, &ds[o][ty * TM]);
      lds(bv, &bs[o][tx * TR]);
      outer(gacc, dv, bv);
    }

    Acc dacc[TO][TR];
    zero(dacc);
    Acc bsum[TO];
#pragma unroll
    for (int t = 0; t < TO; ++t) bsum[t] = Acc(0);
#pragma unroll 8
    for (int n = 0; n < BM; ++n) {
      Acc dv[TO], av[TR];
#pragma unroll
      for (int t = 0; t < TO; ++t) dv[t] = ds[ty * TO + t][n];
      lds(av, &as[n][tx * TR]);
      outer(dacc, dv, av);
      if (do_bias) {
#pragma unroll
        for (int t = 0; t < TO; ++t) bsum[t] += dv[t];
      }
    }
#pragma unroll
    for (int t = 0; t < TO; ++t) {
      const int64_t o = o0 + ty * TO + t;
      if (o >= out) continue;
#pragma unroll
      for (int j = 0; j < TR; ++j) {
        const int64_t k = k0 + tx * TR + j;
        if (k < r) atomicAdd(dB + o * r + k, dacc[t][j]);
      }
      if (do_bias && tx == 0) atomicAdd(dbias + o, bsum[t]);
    }
    __syncthreads();  // the next iteration overwrites the tiles
  }

#pragma unroll
  for (int m = 0; m < TM; ++m) {
    const int64_t row = row0 + ty * TM + m;
    if (row >= N) continue;
#pragma unroll
    for (int j = 0; j < TR; ++j) {
      const int64_t k = k0 + tx * TR + j;
      if (k >= r) continue;
      if (atomic_g) {
        atomicAdd(g + row * r + k, gacc[m][j]);
      } else {
        g[row * r + k] = gacc[m][j];
      }
    }
  }
}

template <typename Acc>
__global__ void __launch_bounds__(kThreads) lora_zero_kernel(Acc* __restrict__ p, int64_t n) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < n; i += stride) {
    p[i] = Acc(0);
  }
}

// ---------------------------------------------------------------------------------------------
// dy pass, deterministic dB / dbias: each block owns BO output columns x one rank chunk and loops
// over all N rows in BN-row steps, so every dB element is written once, without atomics.
//   dB [BO x RC] = sum over row steps of dy_rows^T [BO x BN] . a_rows [BN x RC]
// thread: outs ty*TO.., ranks tx*TR..
template <typename T, int BO, int BN, int RC, int TR>
__global__ void __launch_bounds__(kThreads)
    lora_db_kernel(const T* __restrict__ dy, const AccT<T>* __restrict__ a,
                   AccT<T>* __restrict__ dB, AccT<T>* __restrict__ dbias, int64_t N, int64_t out,
                   int64_t r, bool dy_vec) {
  using Acc = AccT<T>;
  constexpr int TXN = RC / TR, TYN = kThreads / TXN, TO = BO / TYN;
  static_assert(TXN * TYN == kThreads && TO * TYN == BO && TO >= 1, "thread layout");
  static_assert(sizeof(Acc) * BN * (BO + RC + 2 * kPad) <= kSmemLimit, "shared memory");
  __shared__ __align__(16) Acc ds[BN][BO + kPad];  // dy rows: ds[n][o]
  __shared__ __align__(16) Acc as[BN][RC + kPad];  // a rows: as[n][k]

  const int tid = static_cast<int>(threadIdx.x), tx = tid % TXN, ty = tid / TXN;
  const int64_t o0 = static_cast<int64_t>(blockIdx.x) * BO;
  const int64_t k0 = static_cast<int64_t>(blockIdx.y) * RC;
  const bool do_bias = dbias != nullptr && blockIdx.y == 0;

  Acc dacc[TO][TR];
  zero(dacc);
  Acc bsum[TO];
#pragma unroll
  for (int t = 0; t < TO; ++t) bsum[t] = Acc(0);

  for (int64_t n0 = 0; n0 < N; n0 += BN) {
    stage_rows4<T, BN, BO>(dy, n0, N, o0, out, dy_vec, &ds[0][0]);
#pragma unroll
    for (int s = 0; s < BN * RC / kThreads; ++s) {
      const int u = tid + s * kThreads, n = u / RC, k = u % RC;
      const int64_t nn = n0 + n, kk = k0 + k;
      as[n][k] = (nn < N && kk < r) ? a[nn * r + kk] : Acc(0);
    }
    __syncthreads();
#pragma unroll 4
    for (int n = 0; n < BN; ++n) {
      Acc dv[TO], av[TR];
      lds(dv, &ds[n][ty * TO]);
      lds(av, &as[n][tx * TR]);
      outer(dacc, dv, av);
      if (do_bias) {
#pragma unroll
        for (int t = 0; t < TO; ++t) bsum[t] += dv[t];
      }
    }
    __syncthreads();  // the next iteration overwrites the tiles
  }

#pragma unroll
  for (int t = 0; t < TO; ++t) {
    const int64_t o = o0 + ty * TO + t;
    if (o >= out) continue;
#pragma unroll
    for (int j = 0; j < TR; ++j) {
      const int64_t k = k0 + tx * TR + j;
      if (k < r) dB[o * r + k] = dacc[t][j];
    }
    if (do_bias && tx == 0) dbias[o] = bsum[t];
  }
}

// ---------------------------------------------------------------------------------------------
// x pass: dA += dpre^T drop(x) (kDA), dx = mask * scale * (dpre A) (kDx).
//
// Block: BI = 64 columns of `in` (grid.x) x a group of `tiles_per_block` consecutive BM-row tiles
// (grid.y). Per row tile:
//   dx [BM x BI]  = dpre_rows [BM x RC] . A_cols [RC x BI]  thread: column group gx (4 columns),
//                                                           rows ry + 16*m
//   dA [RC x BI] += dpre_rows^T . drop(x) [BM x BI]         thread: ranks aty*TRa.., cols atx*TIa..
// The dx thread layout is also the x staging layout, so each thread keeps the dropout mask of the
// elements whose dx it writes in registers: one Philox call per 4 columns serves dA and dx.
//   kDx && kDA : r <= RC (a single rank chunk); dA accumulates in registers across the block's
//                row tiles and is added atomically once at the end.
//   kDA only   : rank chunk blockIdx.z. With grid.y = 1 a block sees every row and writes dA
//                directly (deterministic); otherwise it adds atomically.
//   kDx only   : loops over every rank chunk per row tile; x itself is not read, only the mask.
template <typename T, int BM, int RC, int TRa, int TIa, bool kDx, bool kDA>
__global__ void __launch_bounds__(kThreads)
    lora_x_kernel(const T* __restrict__ x, const T* __restrict__ A,
                  const AccT<T>* __restrict__ dpre, AccT<T>* __restrict__ dA, T* __restrict__ dx,
                  int64_t N, int64_t in, int64_t r, bool x_vec, bool dx_vec,
                  const int64_t* __restrict__ seed_ptr, uint32_t threshold, AccT<T> scale,
                  int64_t tiles_per_block, bool atomic_dA) {
  using Acc = AccT<T>;
  constexpr int BI = 64;
  constexpr int kGroups = BI / 4;               // 4-column groups per row
  constexpr int kRowStep = kThreads / kGroups;  // 16 rows per pass of the block
  constexpr int TMx = BM / kRowStep;            // rows per thread (dx, staging)
  constexpr int ATX = BI / TIa, ATY = RC / TRa;
  static_assert(kDx || kDA, "nothing to compute");
  static_assert(TMx * kRowStep == BM && ATX * ATY == kThreads && ATX * TIa == BI &&
                    ATY * TRa == RC,
                "thread layout");
  constexpr int kXRows = kDA ? BM : 1;
  constexpr int kARows = kDx ? RC : 1;
  static_assert(sizeof(Acc) * ((kXRows + kARows) * (BI + kPad) + BM * (RC + kPad)) <=
                    kSmemLimit,
                "shared memory");
  __shared__ __align__(16) Acc xs[kXRows][BI + kPad];  // drop(x) tile: xs[n][i]
  __shared__ __align__(16) Acc ps[BM][RC + kPad];      // dpre rows: ps[n][k]
  __shared__ __align__(16) Acc as[kARows][BI + kPad];  // A columns: as[k][i]

  const int tid = static_cast<int>(threadIdx.x);
  const int gx = tid % kGroups, ry = tid / kGroups;
  const int atx = tid % ATX, aty = tid / ATX;
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * BI;
  const int64_t col = i0 + 4 * gx;  // first column of this thread's group
  const int64_t col_rem = in - col;
  const int col_valid = col_rem >= 4 ? 4 : (col_rem > 0 ? static_cast<int>(col_rem) : 0);
  const int64_t row_tiles = (N + BM - 1) / BM;
  const int64_t tile_begin = static_cast<int64_t>(blockIdx.y) * tiles_per_block;
  const int64_t tile_end =
      tile_begin + tiles_per_block < row_tiles ? tile_begin + tiles_per_block : row_tiles;
  const int64_t chunks = r > RC ? (r + RC - 1) / RC : 1;
  const int64_t c_begin = kDx ? 0 : static_cast<int64_t>(blockIdx.z);
  const int64_t c_end = kDA ? c_begin + 1 : chunks;
  const bool a_resident = c_end - c_begin == 1;  // one rank chunk: A columns staged once
  const bool drop = threshold != 0;
  const int64_t seed = drop ? *seed_ptr : 0;

  Acc dacc[TRa][TIa];
  zero(dacc);

  if constexpr (kDx) {
    if (a_resident) stage_rows<RC, BI>(A, c_begin * RC, r, i0, in, &as[0][0]);
  }

  for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
    const int64_t row0 = tile * BM;
    // Keep masks of this thread's dx elements (bit e: column col + e); all kept without dropout.
    uint32_t keep[TMx];
#pragma unroll
    for (int m = 0; m < TMx; ++m) {
      keep[m] = 0xFu;
      const int64_t row = row0 + ry + kRowStep * m;
      const bool valid = row < N && col_valid > 0;
      if constexpr (kDA) {
        Acc v[4] = {Acc(0), Acc(0), Acc(0), Acc(0)};
        if (valid) {
          load4(x + row * in + col, col_valid, x_vec, v);
          if (drop) keep[m] = dropout4(v, seed, threshold, scale, row, col);
        }
        sts4(&xs[ry + kRowStep * m][4 * gx], v);
      } else {
        if (valid && drop) {
          Acc v[4] = {Acc(0), Acc(0), Acc(0), Acc(0)};
          keep[m] = dropout4(v, seed, threshold, scale, row, col);
        }
      }
    }

    Acc xacc[TMx][4];
    zero(xacc);
    for (int64_t c = c_begin; c < c_end; ++c) {
      const int64_t k0 = c * RC;
      if constexpr (kDx) {
        if (!a_resident) stage_rows<RC, BI>(A, k0, r, i0, in, &as[0][0]);
      }
      // dpre[row0 + n, k0 + k] -> ps[n][k]
#pragma unroll
      for (int s = 0; s < BM * RC / kThreads; ++s) {
        const int u = tid + s * kThreads, n = u / RC, k = u % RC;
        const int64_t nn = row0 + n, kk = k0 + k;
        ps[n][k] = (nn < N && kk < r) ? dpre[nn * r + kk] : Acc(0);
      }
      __syncthreads();

      if constexpr (kDA) {
#pragma unroll 8
        for (int n = 0; n < BM; ++n) {
          Acc pv[TRa], xv[TIa];
          lds(pv, &ps[n][aty * TRa]);
          lds(xv, &xs[n][atx * TIa]);
          outer(dacc, pv, xv);
        }
      }
      if constexpr (kDx) {
#pragma unroll 8
        for (int k = 0; k < RC; ++k) {
          Acc pv[TMx], av[4];
#pragma unroll
          for (int m = 0; m < TMx; ++m) pv[m] = ps[ry + kRowStep * m][k];
          lds(av, &as[k][4 * gx]);
          outer(xacc, pv, av);
        }
      }
      __syncthreads();  // the next chunk / tile overwrites the tiles
    }

    if constexpr (kDx) {
#pragma unroll
      for (int m = 0; m < TMx; ++m) {
        const int64_t row = row0 + ry + kRowStep * m;
        if (row >= N || col_valid == 0) continue;
        Acc v[4];
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          // Dropped elements are exactly 0 (scale may be inf at p = 1).
          v[e] = !drop ? xacc[m][e] : (((keep[m] >> e) & 1u) ? xacc[m][e] * scale : Acc(0));
        }
        store4(dx + row * in + col, col_valid, dx_vec, v);
      }
    }
  }

  if constexpr (kDA) {
    const int64_t k0 = c_begin * RC;
#pragma unroll
    for (int j = 0; j < TRa; ++j) {
      const int64_t k = k0 + aty * TRa + j;
      if (k >= r) continue;
#pragma unroll
      for (int c = 0; c < TIa; ++c) {
        const int64_t i = i0 + atx * TIa + c;
        if (i >= in) continue;
        if (atomic_dA) {
          atomicAdd(dA + k * in + i, dacc[j][c]);
        } else {
          dA[k * in + i] = dacc[j][c];
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Launchers. Rank chunk: 16, 32 or 64 (32 at most for double, whose tiles are twice the bytes).

// lora_rows_kernel configuration per rank chunk: 8 (RC = 16) or 16 accumulators per thread.
template <typename T, int RC>
struct RowsCfg {
  static constexpr int BM = 32;
  static constexpr int BK = sizeof(AccT<T>) == 8 ? 32 : 64;
  static constexpr int KS = RC == 64 ? 2 : 4;
  static constexpr int TR = RC == 16 ? 2 : 4;
};

template <typename T, int RC>
void shrink_launch(const LoraShrinkParams& p, cudaStream_t stream) {
  using Acc = AccT<T>;
  using Cfg = RowsCfg<T, RC>;
  const dim3 grid(static_cast<unsigned>(ceil_div(p.N, Cfg::BM)),
                  static_cast<unsigned>(ceil_div(p.r, RC)));
  lora_rows_kernel<T, Cfg::BM, Cfg::BK, RC, Cfg::KS, Cfg::TR, true>
      <<<grid, kThreads, 0, stream>>>(
          static_cast<const T*>(p.x), static_cast<const T*>(p.A), static_cast<Acc*>(p.pre), p.N,
          p.in, p.r, aligned_rows(p.x, p.in, sizeof(T)), aligned_rows(p.A, p.in, sizeof(T)),
          p.dropout.seed, p.dropout.threshold, static_cast<Acc>(p.dropout.scale));
}

template <typename T>
void shrink_dispatch(const LoraShrinkParams& p, cudaStream_t stream) {
  if (p.r <= 16) {
    shrink_launch<T, 16>(p, stream);
  } else if (p.r <= 32) {
    shrink_launch<T, 32>(p, stream);
  } else {
    shrink_launch<T, 64>(p, stream);
  }
}

template <typename T, int RC>
void dy_launch(const LoraDyPassParams& p, cudaStream_t stream) {
  using Acc = AccT<T>;
  const int64_t chunks = p.r > RC ? ceil_div(p.r, RC) : 1;  // r = 0 still needs dbias
  const T* dy = static_cast<const T*>(p.dy);
  const T* B = static_cast<const T*>(p.B);
  const Acc* a = static_cast<const Acc*>(p.a);
  Acc* g = static_cast<Acc*>(p.g);
  Acc* dB = static_cast<Acc*>(p.dB);
  Acc* dbias = static_cast<Acc*>(p.dbias);
  const bool dy_vec = aligned_rows(p.dy, p.out, sizeof(T));

  if (!p.deterministic) {
    constexpr int BM = sizeof(Acc) == 8 ? 64 : 128;
    constexpr int BO = RC == 64 ? 16 : 32;
    constexpr int TR = RC == 16 ? 2 : 4;
    const int64_t row_tiles = ceil_div(p.N, BM);
    const int64_t out_steps = ceil_div(p.out, BO);
    // Split `out` over grid.z until there are about kDyTargetBlocks blocks.
    int64_t steps_per_block = out_steps > 1 ? out_steps : 1;
    int64_t splits = 1;
    if (out_steps > 1) {
      int64_t want = ceil_div(kDyTargetBlocks, row_tiles * chunks);
      want = want < 1 ? 1 : (want > out_steps ? out_steps : want);
      steps_per_block = ceil_div(out_steps, want);
      splits = ceil_div(out_steps, steps_per_block);
    }
    if (splits > 1 && p.r > 0) {
      const int64_t n = p.N * p.r;
      const int64_t blocks = ceil_div(n, kThreads);
      lora_zero_kernel<Acc>
          <<<static_cast<unsigned>(blocks < 4096 ? blocks : 4096), kThreads, 0, stream>>>(g, n);
    }
    const dim3 grid(static_cast<unsigned>(row_tiles), static_cast<unsigned>(chunks),
                    static_cast<unsigned>(splits));
    lora_dy_kernel<T, BM, BO, RC, TR><<<grid, kThreads, 0, stream>>>(
        dy, B, a, g, dB, dbias, p.N, p.out, p.r, dy_vec, steps_per_block, splits > 1);
    return;
  }

  // Deterministic: g by the row-block kernel, dB / dbias by column-owning blocks.
  using Cfg = RowsCfg<T, RC>;
  const dim3 grid_g(static_cast<unsigned>(ceil_div(p.N, Cfg::BM)), static_cast<unsigned>(chunks));
  lora_rows_kernel<T, Cfg::BM, Cfg::BK, RC, Cfg::KS, Cfg::TR, false>
      <<<grid_g, kThreads, 0, stream>>>(dy, B, g, p.N, p.out, p.r, dy_vec, false, nullptr, 0u,
                                        Acc(1));
  if (p.out > 0) {
    constexpr int kBO = 32, kBN = 64;
    constexpr int TR = RC == 16 ? 2 : 4;
    const dim3 grid_db(static_cast<unsigned>(ceil_div(p.out, kBO)),
                       static_cast<unsigned>(chunks));
    lora_db_kernel<T, kBO, kBN, RC, TR>
        <<<grid_db, kThreads, 0, stream>>>(dy, a, dB, dbias, p.N, p.out, p.r, dy_vec);
  }
}

template <typename T>
void dy_dispatch(const LoraDyPassParams& p, cudaStream_t stream) {
  if (p.r <= 16) {
    dy_launch<T, 16>(p, stream);
  } else if constexpr (sizeof(AccT<T>) == 8) {
    dy_launch<T, 32>(p, stream);
  } else if (p.r <= 32) {
    dy_launch<T, 32>(p, stream);
  } else {
    dy_launch<T, 64>(p, stream);
  }
}

template <typename T, int RC>
void x_launch(const LoraXPassParams& p, cudaStream_t stream) {
  using Acc = AccT<T>;
  constexpr bool kDouble = sizeof(Acc) == 8;
  constexpr int BI = 64;
  constexpr int BM = (kDouble || RC == 64) ? 32 : 64;
  constexpr int TRa = 4;
  constexpr int TIa = RC * BI / (kThreads * TRa);
  const int64_t row_tiles = ceil_div(p.N, BM);
  const int64_t col_tiles = ceil_div(p.in, BI);
  const int64_t chunks = p.r > RC ? ceil_div(p.r, RC) : 1;
  const int64_t min_tiles = ceil_div(row_tiles, kMaxGridY);  // keeps grid.y within limits
  // Row tiles per block of a dA kernel whose other grid dimensions hold `blocks` blocks.
  auto tiles_per_block = [&](int64_t blocks) -> int64_t {
    if (p.deterministic) return row_tiles;  // one block per dA element: plain stores
    int64_t groups = ceil_div(kXTargetBlocks, blocks);
    groups = groups < 1 ? 1 : (groups > row_tiles ? row_tiles : groups);
    const int64_t tiles = ceil_div(row_tiles, groups);
    return tiles > min_tiles ? tiles : min_tiles;
  };

  const T* x = static_cast<const T*>(p.x);
  const T* A = static_cast<const T*>(p.A);
  const Acc* dpre = static_cast<const Acc*>(p.dpre);
  Acc* dA = static_cast<Acc*>(p.dA);
  T* dx = static_cast<T*>(p.dx);
  const bool x_vec = aligned_rows(p.x, p.in, sizeof(T));
  const bool dx_vec = aligned_rows(p.dx, p.in, sizeof(T));
  const uint32_t threshold = p.dropout.threshold;  // 0: disabled (then the seed is not read)
  const Acc scale = static_cast<Acc>(p.dropout.scale);

  if (!p.deterministic && chunks == 1) {
    // One kernel, one read of x, one Philox call per 4 elements for both outputs.
    const int64_t tiles = tiles_per_block(col_tiles);
    const dim3 grid(static_cast<unsigned>(col_tiles),
                    static_cast<unsigned>(ceil_div(row_tiles, tiles)), 1);
    if (dx != nullptr) {
      lora_x_kernel<T, BM, RC, TRa, TIa, true, true><<<grid, kThreads, 0, stream>>>(
          x, A, dpre, dA, dx, p.N, p.in, p.r, x_vec, dx_vec, p.dropout.seed, threshold, scale,
          tiles, true);
    } else {
      lora_x_kernel<T, BM, RC, TRa, TIa, false, true><<<grid, kThreads, 0, stream>>>(
          x, A, dpre, dA, dx, p.N, p.in, p.r, x_vec, dx_vec, p.dropout.seed, threshold, scale,
          tiles, true);
    }
    return;
  }

  // Deterministic or r > RC: dA per rank chunk (grid.z), dx by a kernel that loops over chunks.
  const int64_t tiles = tiles_per_block(col_tiles * chunks);
  const dim3 grid_da(static_cast<unsigned>(col_tiles),
                     static_cast<unsigned>(ceil_div(row_tiles, tiles)),
                     static_cast<unsigned>(chunks));
  lora_x_kernel<T, BM, RC, TRa, TIa, false, true><<<grid_da, kThreads, 0, stream>>>(
      x, A, dpre, dA, nullptr, p.N, p.in, p.r, x_vec, false, p.dropout.seed, threshold, scale,
      tiles, !p.deterministic);
  if (dx != nullptr) {
    const dim3 grid_dx(static_cast<unsigned>(col_tiles),
                       static_cast<unsigned>(ceil_div(row_tiles, min_tiles)), 1);
    lora_x_kernel<T, BM, RC, TRa, TIa, true, false><<<grid_dx, kThreads, 0, stream>>>(
        x, A, dpre, nullptr, dx, p.N, p.in, p.r, x_vec, dx_vec, p.dropout.seed, threshold, scale,
        min_tiles, false);
  }
}

template <typename T>
void x_dispatch(const LoraXPassParams& p, cudaStream_t stream) {
  if (p.r <= 16) {
    x_launch<T, 16>(p, stream);
  } else if constexpr (sizeof(AccT<T>) == 8) {
    x_launch<T, 32>(p, stream);
  } else if (p.r <= 32) {
    x_launch<T, 32>(p, stream);
  } else {
    x_launch<T, 64>(p, stream);
  }
}

}  // namespace

void lora_shrink_cuda(const LoraShrinkParams& p, cudaStream_t stream) {
  if (p.N <= 0 || p.r <= 0) return;  // nothing to write (in = 0 still writes pre = 0)
  switch (p.dtype) {
    case DType::kFloat32: shrink_dispatch<float>(p, stream); break;
    case DType::kFloat64: shrink_dispatch<double>(p, stream); break;
    case DType::kFloat16: shrink_dispatch<__half>(p, stream); break;
    case DType::kBFloat16: shrink_dispatch<__nv_bfloat16>(p, stream); break;
  }
}

void lora_dy_pass_cuda(const LoraDyPassParams& p, cudaStream_t stream) {
  // N = 0: g is empty and dB / dbias stay at their zero init. out = 0 still writes g = 0.
  if (p.N <= 0 || p.r < 0) return;
  switch (p.dtype) {
    case DType::kFloat32: dy_dispatch<float>(p, stream); break;
    case DType::kFloat64: dy_dispatch<double>(p, stream); break;
    case DType::kFloat16: dy_dispatch<__half>(p, stream); break;
    case DType::kBFloat16: dy_dispatch<__nv_bfloat16>(p, stream); break;
  }
}

void lora_x_pass_cuda(const LoraXPassParams& p, cudaStream_t stream) {
  // N = 0: dA stays at its zero init; in = 0: both outputs are empty.
  if (p.N <= 0 || p.in <= 0 || p.r < 0) return;
  switch (p.dtype) {
    case DType::kFloat32: x_dispatch<float>(p, stream); break;
    case DType::kFloat64: x_dispatch<double>(p, stream); break;
    case DType::kFloat16: x_dispatch<__half>(p, stream); break;
    case DType::kBFloat16: x_dispatch<__nv_bfloat16>(p, stream); break;
  }
}

}  // namespace peft_kernels
