// CUDA kernels of the sparse delta linear (see kernels/sparse_delta_linear.h).
//
// Every kernel gathers: entry (r, c) pairs feature c of x with feature r of dy (or of y), and a
// row's entries hit random columns. So the kernels stage tokens x features tiles in shared memory
// *feature-major*: feature f's 8V tokens (V = 16 / sizeof(T): 64 half / bfloat16, 32 float, 16
// double tokens) are one 128-byte row of 8 16-byte chunks. One 16-byte shared load then gives a
// thread V consecutive tokens of one feature, and 8 lanes loading 8 *different* chunks of any 8
// rows touch all 32 banks once (no conflicts, whatever the columns). stage_tile transposes V x V
// blocks in registers: 16-byte global loads along the features (coalesced), conflict-free 16-byte
// shared stores.
//
//   spmm   spmm_kernel<T, kTranspose>: block = (kMmRows<T> * 32 destination features, token
//          tile of 8V). Thread = (destination feature of its warp quarter, chunk q = lane % 8):
//          the 8 lanes of a feature read the 8 chunks of the same staged row, and the value is a
//          broadcast. The block visits only the windows of kMmWindow source features that hold
//          pending entries (the next window starts at the smallest pending column, a block-wide
//          atomicMin on an int: order-free), stages x's window, and every feature advances
//          through its entries in it. Sums stay in registers across windows, in entry order, so
//          the result depends neither on the window nor on the grouping. They go through shared
//          memory so that y is read, updated and written coalesced, once per element; features
//          without entries are not touched. kTranspose walks the column view (col_ptr, col_order,
//          gathering x[n, rows[t]]) the same way: a gather-sum per y element, no atomics.
//   sddmm  sddmm_tile_kernel: block = (G rows x W columns tile of Delta, token slice). It lists
//          the tile's entries once (binary search of each row's window, block scan), gives each
//          thread a run of <= kSdRun consecutive ones (mostly of one row, so dy's chunks are
//          reloaded only when the row changes), then for every token tile stages x's W columns
//          and dy's G rows and accumulates one register per entry. Lane l reads chunk (k + l) % 8
//          at step k: 8 lanes, 8 distinct chunks, conflict-free for any columns. Tiles with more
//          entries than a round holds (unbalanced rows) run several rounds. G and W follow the
//          device's shared memory; they do not change the result (below).
//          sddmm_direct_kernel: one thread per (entry, slice), operands from global memory, the
//          same arithmetic: used where the tiles would be nearly empty (very sparse, huge Delta).
//          With several token slices the partial sums go to the workspace and
//          sddmm_reduce_kernel adds them in slice order.
//
// Determinism (sddmm). dvalues[t] is a fixed expression: the token slices are a function of the
// shape only (sd_slices); inside a slice, per tile of 8V tokens, chunk q's V products are summed
// in token order (d_q), the 8 chunks by the tree ((d0+d4)+(d2+d6))+((d1+d5)+(d3+d7)), and the
// tiles in order. A tile-path lane holds the chunks rotated (slot k = chunk (k + l) % 8) and adds
// slots with the same tree: each level pairs chunks whose indices differ by 4, 2, 1 (mod 8), and
// rotation maps such pairs onto themselves, so with a + b == b + a every lane computes the same
// bits as the direct path. Hence G, W, the rounds, the block size and the path never change the
// result: the same bits on every run and GPU. All sums use explicit _rn intrinsics (no FMA
// contraction). spmm is sequential per element in entry order.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "cuda/elem.cuh"
#include "kernels/sparse_delta_linear.h"

namespace peft_kernels {
namespace {

constexpr int kChunks = 8;                // 16-byte chunks per staged feature row
constexpr int kRowBytes = 16 * kChunks;   // one staged feature: 8V tokens
constexpr int kDefaultSmem = 48 * 1024;   // dynamic shared memory without opting in
constexpr int64_t kMaxGridY = 65535;
constexpr int64_t kMaxGridX = 2147483647;

// spmm: 256 threads = 32 destination features x 8 chunk lanes, kMmRows<T> features per thread.
constexpr int kMmThreads = 256;
constexpr int kMmWindow = 256;  // source features per staged window (32 KB)

// sddmm: 512 threads, up to kSdRun entries each per round (one register accumulator each).
constexpr int kSdThreads = 512;
constexpr int kSdRun = 16;
constexpr int kSdMaxCap = kSdThreads * kSdRun;  // entries per round
constexpr int kSdMinCap = kSdThreads;           // the meta area doubles as the scan's scratch
constexpr int kSdMaxFeatures = 32768;           // G, W: 15-bit fields of the entry meta word
constexpr double kSdFill = 0.75;                // expected entries per tile / round capacity
// Token slices (a function of the shape only): about kSdTargetBlocks blocks for the typical tile
// count nnz / kSdEstTileEntries, slices of >= kSdMinSliceTokens tokens, a bounded workspace.
constexpr int64_t kSdTargetBlocks = 512;
constexpr int64_t kSdEstTileEntries = 4096;
constexpr int64_t kSdMinSliceTokens = 256;
constexpr int64_t kSdMaxSlices = 512;
constexpr int64_t kSdMaxPartialElems = int64_t{1} << 26;
constexpr int kSdDirectThreads = 256;
constexpr int kReduceThreads = 256;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
__host__ __device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
__host__ __device__ __forceinline__ int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }
bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// ---------------------------------------------------------------------------------------------
// Element types: cu::Elem's conversions, and unpack, which turns one 16-byte chunk (V elements)
// into V accumulators.
template <typename T>
struct Elem;
template <>
struct Elem<float> : cu::Elem<float> {
  static constexpr int V = 4;
  static __device__ __forceinline__ void unpack(const uint4& q, float (&v)[4]) {
    v[0] = __uint_as_float(q.x);
    v[1] = __uint_as_float(q.y);
    v[2] = __uint_as_float(q.z);
    v[3] = __uint_as_float(q.w);
  }
};
template <>
struct Elem<double> : cu::Elem<double> {
  static constexpr int V = 2;
  static __device__ __forceinline__ void unpack(const uint4& q, double (&v)[2]) {
    memcpy(v, &q, sizeof(q));
  }
};
template <>
struct Elem<__half> : cu::Elem<__half> {
  static constexpr int V = 8;
  static __device__ __forceinline__ void unpack(const uint4& q, float (&v)[8]) {
    __half2 h[4];
    memcpy(h, &q, sizeof(q));
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 f = __half22float2(h[i]);
      v[2 * i] = f.x;
      v[2 * i + 1] = f.y;
    }
  }
};
template <>
struct Elem<__nv_bfloat16> : cu::Elem<__nv_bfloat16> {
  static constexpr int V = 8;
  // A bfloat16 is the high half of a float: two bit operations per pair, exact.
  static __device__ __forceinline__ void unpack(const uint4& q, float (&v)[8]) {
    const uint32_t w[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      v[2 * i] = __uint_as_float(w[i] << 16);
      v[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
  }
};
template <typename T>
using AccT = typename Elem<T>::Acc;
template <typename T>
constexpr int kVec = Elem<T>::V;
template <typename T>
constexpr int kTok = kChunks * Elem<T>::V;  // tokens per staged tile

// Rounded arithmetic that the compiler may not contract or reorder (the sddmm paths must agree
// bit for bit).
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ float fma_rn(float a, float b, float c) { return __fmaf_rn(a, b, c); }
__device__ __forceinline__ double fma_rn(double a, double b, double c) { return __fma_rn(a, b, c); }

__device__ __forceinline__ uint4 lds16(const unsigned char* p) {
  return *reinterpret_cast<const uint4*>(p);
}

// sum_i x[i] y[i] over one chunk, in token order.
template <typename T>
__device__ __forceinline__ AccT<T> chunk_dot(const uint4& xq, const uint4& yq) {
  using Acc = AccT<T>;
  constexpr int V = kVec<T>;
  Acc xv[V], yv[V];
  Elem<T>::unpack(xq, xv);
  Elem<T>::unpack(yq, yv);
  Acc s = mul_rn(xv[0], yv[0]);
#pragma unroll
  for (int i = 1; i < V; ++i) s = fma_rn(xv[i], yv[i], s);
  return s;
}

// The 8 chunk sums of a tile, paired by index distance 4, 2, 1: invariant under rotating the
// chunk order (see the top of the file).
template <typename Acc>
__device__ __forceinline__ Acc tree8(const Acc (&d)[kChunks]) {
  return add_rn(add_rn(add_rn(d[0], d[4]), add_rn(d[2], d[6])),
                add_rn(add_rn(d[1], d[5]), add_rn(d[3], d[7])));
}

// ---------------------------------------------------------------------------------------------
// Staging. dst[f * kRowBytes + q * 16 ..] = tokens [n0 + qV, n0 + qV + V) of feature f0 + f of
// the row-major [*, ld] matrix src, for f < nf; tokens >= n_end are zero. With `vec` (src 16-byte
// aligned, ld and f0 multiples of V) a thread takes a V x V block (V tokens x V features): V
// 16-byte loads (lanes of neighbouring feature groups read neighbouring 16 bytes), a register
// transpose and V 16-byte stores, the 8 lanes of a quarter warp into the 8 chunks of one row
// (no bank conflicts). Rows up to nf rounded up to V are written (dst has room: callers size
// tiles in multiples of 8 features). Otherwise one thread per (feature, chunk).
template <typename T>
__device__ __forceinline__ void stage_tile(const T* __restrict__ src, int64_t ld, int64_t n0,
                                           int64_t n_end, int64_t f0, int nf, bool vec,
                                           unsigned char* __restrict__ dst, int tid,
                                           int nthreads) {
  constexpr int V = kVec<T>;
  if (vec) {
    const int units = (nf + V - 1) / V * kChunks;
    for (int u = tid; u < units; u += nthreads) {
      const int q = u % kChunks, g = u / kChunks;
      T e[V][V];  // e[i][j]: token q V + i, feature g V + j
#pragma unroll
      for (int i = 0; i < V; ++i) {
        const int64_t n = n0 + q * V + i;
        uint4 w = make_uint4(0u, 0u, 0u, 0u);
        if (n < n_end) w = *reinterpret_cast<const uint4*>(src + n * ld + f0 + g * V);
        memcpy(e[i], &w, sizeof(w));
      }
#pragma unroll
      for (int j = 0; j < V; ++j) {
        T o[V];
#pragma unroll
        for (int i = 0; i < V; ++i) o[i] = e[i][j];
        uint4 w;
        memcpy(&w, o, sizeof(w));
        *reinterpret_cast<uint4*>(dst + static_cast<int64_t>(g * V + j) * kRowBytes + q * 16) = w;
      }
    }
  } else {
    const int units = nf * kChunks;
    for (int u = tid; u < units; u += nthreads) {
      const int q = u % kChunks, f = u / kChunks;
      T o[V];
      memset(o, 0, sizeof(o));
#pragma unroll
      for (int i = 0; i < V; ++i) {
        const int64_t n = n0 + q * V + i;
        if (n < n_end) o[i] = src[n * ld + f0 + f];
      }
      uint4 w;
      memcpy(&w, o, sizeof(w));
      *reinterpret_cast<uint4*>(dst + static_cast<int64_t>(f) * kRowBytes + q * 16) = w;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// spmm

template <typename T>
constexpr int kMmRows = kVec<T> == 8 ? 4 : 8;  // destination features per thread (<= 32 sums)
template <typename T>
constexpr int kMmGroup = kMmThreads / kChunks * kMmRows<T>;  // destination features per block
// The sums go to global memory through ys[token][feature] (pitch kMmGroup + 1), this many tokens
// at a time (~33 KB).
template <typename T>
constexpr int kMmYsTokens = static_cast<int>(128 / sizeof(AccT<T>)) < kTok<T>
                                ? static_cast<int>(128 / sizeof(AccT<T>))
                                : kTok<T>;

template <typename T>
struct MmArgs {
  const int64_t* ptr;     // [nout + 1]: row_ptr, or col_ptr with kTranspose
  const int32_t* order;   // col_order with kTranspose (entry of each column-view position)
  const int32_t* gather;  // source feature of each entry: cols, or rows with kTranspose
  const T* values;
  const T* x;             // [N, nin]
  T* y;                   // [N, nout]
  int64_t nout, nin, N, token_tiles;
  bool x_vec;
};

template <typename T>
int64_t mm_smem_bytes() {
  const int64_t window = int64_t{kMmWindow} * kRowBytes;
  const int64_t ys = int64_t{kMmYsTokens<T>} * (kMmGroup<T> + 1) * sizeof(AccT<T>);
  return window > ys ? window : ys;
}

template <typename T, bool kTranspose>
__global__ void __launch_bounds__(kMmThreads, 2)
    spmm_kernel(const MmArgs<T> a) {
  using Acc = AccT<T>;
  constexpr int V = kVec<T>;
  constexpr int R = kMmRows<T>;
  constexpr int G = kMmGroup<T>;
  constexpr int TOK = kTok<T>;
  constexpr int YT = kMmYsTokens<T>;
  extern __shared__ __align__(16) unsigned char mm_smem[];
  // Entry cursors of the block's features (read from [par], written to [par ^ 1] each window),
  // their ends, and the next window's first column.
  __shared__ int64_t s_cur[2][G];
  __shared__ int64_t s_end[G];
  __shared__ int s_next[2];
  unsigned char* const xs = mm_smem;
  Acc* const ys = reinterpret_cast<Acc*>(mm_smem);

  const int tid = static_cast<int>(threadIdx.x);
  const int q = tid % kChunks;     // chunk: tokens [qV, qV + V) of the tile
  const int slot = tid / kChunks;  // features slot, slot + 32, ... of the block
  const int64_t f0 = static_cast<int64_t>(blockIdx.x) * G;
  const int gr = static_cast<int>(min64(G, a.nout - f0));

  for (int64_t tt = blockIdx.y; tt < a.token_tiles; tt += gridDim.y) {
    const int64_t n0 = tt * TOK;
    const int64_t n_end = min64(a.N, n0 + TOK);
    if (tid == 0) s_next[0] = INT_MAX;
    __syncthreads();
    int mine = INT_MAX;
    for (int i = tid; i < G; i += kMmThreads) {
      const int64_t b = i < gr ? a.ptr[f0 + i] : 0, e = i < gr ? a.ptr[f0 + i + 1] : 0;
      s_cur[0][i] = b;
      s_end[i] = e;
      if (b < e) mine = min(mine, a.gather[kTranspose ? a.order[b] : b]);
    }
    if (mine != INT_MAX) atomicMin(&s_next[0], mine);
    __syncthreads();

    Acc acc[R][V];
#pragma unroll
    for (int k = 0; k < R; ++k) {
#pragma unroll
      for (int e = 0; e < V; ++e) acc[k][e] = Acc(0);
    }
    int par = 0;
    int next = s_next[0];
    // next is block-uniform: every thread runs the same windows and barriers.
    while (next != INT_MAX) {
      const int64_t w0 = next & ~7;  // a multiple of 8 (and of V) for the vector staging
      const int nf = static_cast<int>(min64(kMmWindow, a.nin - w0));
      const int64_t w_end = w0 + nf;
      stage_tile<T>(a.x, a.nin, n0, n_end, w0, nf, a.x_vec, xs, tid, kMmThreads);
      if (tid == 0) s_next[par ^ 1] = INT_MAX;
      __syncthreads();
      mine = INT_MAX;
#pragma unroll
      for (int k = 0; k < R; ++k) {
        const int i = slot + 32 * k;
        if (i < gr) {
          int64_t t = s_cur[par][i];
          const int64_t t_end = s_end[i];
          for (; t < t_end; ++t) {
            const int64_t id = kTranspose ? a.order[t] : t;
            const int c = a.gather[id];
            if (c >= w_end) {
              mine = min(mine, c);
              break;
            }
            const Acc v = Elem<T>::load(a.values[id]);
            Acc xv[V];
            Elem<T>::unpack(lds16(xs + (c - w0) * kRowBytes + q * 16), xv);
#pragma unroll
            for (int e = 0; e < V; ++e) acc[k][e] = fma_rn(v, xv[e], acc[k][e]);
          }
          if (q == 0) s_cur[par ^ 1][i] = t;
        }
      }
      if (mine != INT_MAX) atomicMin(&s_next[par ^ 1], mine);
      __syncthreads();  // sums done with xs; s_next[par ^ 1] and s_cur[par ^ 1] complete
      par ^= 1;
      next = s_next[par];
    }

    // y[n0 + n, f0 + i] += sum, YT tokens at a time through ys (coalesced read-add-write).
    for (int p0 = 0; p0 < TOK; p0 += YT) {
      if (p0 >= n_end - n0) break;  // block-uniform
      __syncthreads();  // xs, or the previous ys, is no longer read
#pragma unroll
      for (int k = 0; k < R; ++k) {
        const int i = slot + 32 * k;
#pragma unroll
        for (int e = 0; e < V; ++e) {
          const int tok = q * V + e - p0;
          if (i < gr && tok >= 0 && tok < YT) ys[tok * (G + 1) + i] = acc[k][e];
        }
      }
      __syncthreads();
      const int ntok = static_cast<int>(min64(YT, n_end - n0 - p0));
      for (int u = tid; u < ntok * gr; u += kMmThreads) {
        const int n = u / gr, i = u - n * gr;
        if (s_end[i] == a.ptr[f0 + i]) continue;  // features without entries keep their bits
        T* py = a.y + (n0 + p0 + n) * a.nout + f0 + i;
        *py = Elem<T>::store(add_rn(Elem<T>::load(*py), ys[n * (G + 1) + i]));
      }
    }
    __syncthreads();  // the next token tile's staging overwrites ys; s_next, s_cur are reset
  }
}

template <typename T, bool kTranspose>
void spmm_launch(const SparseDeltaMatmulParams& p, cudaStream_t stream) {
  const SparseDeltaPattern& pat = p.pattern;
  MmArgs<T> a;
  a.ptr = kTranspose ? pat.col_ptr : pat.row_ptr;
  a.order = kTranspose ? pat.col_order : nullptr;
  a.gather = kTranspose ? pat.rows : pat.cols;
  a.values = static_cast<const T*>(p.values);
  a.x = static_cast<const T*>(p.x);
  a.y = static_cast<T*>(p.y);
  a.nout = kTranspose ? pat.in : pat.out;
  a.nin = kTranspose ? pat.out : pat.in;
  a.N = p.N;
  a.token_tiles = ceil_div(p.N, kTok<T>);
  a.x_vec = aligned16(p.x) && a.nin % kVec<T> == 0;
  const dim3 grid(static_cast<unsigned>(ceil_div(a.nout, kMmGroup<T>)),
                  static_cast<unsigned>(min64(a.token_tiles, kMaxGridY)));
  const size_t smem = static_cast<size_t>(mm_smem_bytes<T>());
  auto kernel = spmm_kernel<T, kTranspose>;
  kernel<<<grid, kMmThreads, smem, stream>>>(a);
}

// ---------------------------------------------------------------------------------------------
// sddmm

template <typename T>
struct SdArgs {
  const int64_t* row_ptr;
  const int32_t* rows;
  const int32_t* cols;
  const T* dy;  // [N, out]
  const T* x;   // [N, in]
  AccT<T>* partial;  // [slices, nnz] with several slices, else null
  T* dv;
  int64_t out, in, N, nnz, slice_len;
  int64_t nwin;  // column windows: tile = (blockIdx.x / nwin, blockIdx.x % nwin)
  int G, W, cap;
  int64_t meta_off, row_lo_off, pref_off;  // SdLayout
  bool x_vec, dy_vec;
};

struct SdPlan {
  int64_t slice_len = 0, slices = 0;  // shape only: fixes the result
  bool direct = false;                // below: the execution, free to follow the device
  int G = 0, W = 0, cap = 0;
  int64_t ngroups = 0, nwin = 0;
  int64_t smem = 0;
  int64_t smem_limit = 0;  // the device's per-block maximum after opting in (at least 48 KiB)
};

// Dynamic shared memory of the tile kernel: [tile area][meta: cap][row_lo: G][pref: G + 1],
// each 16-byte aligned. The tile area holds x's W and dy's G staged rows, and at the end of a
// round its sums.
struct SdLayout {
  int64_t meta = 0, row_lo = 0, pref = 0, bytes = 0;
};
SdLayout sd_layout(int G, int W, int cap, int64_t acc_size) {
  auto a16 = [](int64_t b) { return (b + 15) / 16 * 16; };
  SdLayout s;
  s.meta = a16(max64(int64_t{G + W} * kRowBytes, int64_t{cap} * acc_size));
  s.row_lo = s.meta + a16(int64_t{cap} * 4);
  s.pref = s.row_lo + a16(int64_t{G} * 8);
  s.bytes = s.pref + a16(int64_t{G + 1} * 4);
  return s;
}

__device__ __forceinline__ int64_t col_lower_bound(const int32_t* __restrict__ cols, int64_t lo,
                                                   int64_t hi, int64_t key) {
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (cols[mid] < key) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo;
}

// Inclusive Hillis-Steele scan over the kSdThreads threads in s (kSdThreads ints); returns the
// exclusive prefix of v and sets total. Starts and ends with a barrier-separated use of s.
__device__ __forceinline__ int block_exclusive_scan(int v, int* s, int tid, int& total) {
  s[tid] = v;
  __syncthreads();
  for (int off = 1; off < kSdThreads; off <<= 1) {
    const int add = tid >= off ? s[tid - off] : 0;
    __syncthreads();
    s[tid] += add;
    __syncthreads();
  }
  total = s[kSdThreads - 1];
  const int excl = s[tid] - v;
  __syncthreads();
  return excl;
}

template <typename T>
__global__ void __launch_bounds__(kSdThreads, 1)
    sddmm_tile_kernel(const SdArgs<T> a) {
  using Acc = AccT<T>;
  constexpr int TOK = kTok<T>;
  extern __shared__ __align__(16) unsigned char sd_smem[];
  unsigned char* const xs = sd_smem;
  unsigned char* const dys = sd_smem + static_cast<int64_t>(a.W) * kRowBytes;
  Acc* const sums = reinterpret_cast<Acc*>(sd_smem);
  uint32_t* const meta = reinterpret_cast<uint32_t*>(sd_smem + a.meta_off);
  int64_t* const row_lo = reinterpret_cast<int64_t*>(sd_smem + a.row_lo_off);
  int32_t* const pref = reinterpret_cast<int32_t*>(sd_smem + a.pref_off);

  const int tid = static_cast<int>(threadIdx.x);
  const int64_t tile = blockIdx.x;
  const int64_t r0 = tile / a.nwin * a.G, w0 = tile % a.nwin * a.W;
  const int gr = static_cast<int>(min64(a.G, a.out - r0));
  const int wr = static_cast<int>(min64(a.W, a.in - w0));
  const int64_t n_begin = static_cast<int64_t>(blockIdx.y) * a.slice_len;
  const int64_t n_end = min64(a.N, n_begin + a.slice_len);

  // The tile's entries, numbered row by row: row i has [row_lo[i], row_lo[i] + count_i) at
  // positions [pref[i], pref[i + 1]). Each thread takes a contiguous block of rows.
  const int rows_per = (gr + kSdThreads - 1) / kSdThreads;
  const int i_begin = min(gr, tid * rows_per), i_end = min(gr, i_begin + rows_per);
  int local = 0;
  for (int i = i_begin; i < i_end; ++i) {
    const int64_t rb = a.row_ptr[r0 + i], re = a.row_ptr[r0 + i + 1];
    int64_t lo = rb, hi = re;
    if (a.nwin > 1 && rb < re) {
      lo = col_lower_bound(a.cols, rb, re, w0);
      hi = col_lower_bound(a.cols, lo, re, w0 + wr);
    }
    row_lo[i] = lo;
    pref[i] = local;
    local += static_cast<int>(hi - lo);
  }
  int total = 0;
  const int offset = block_exclusive_scan(local, reinterpret_cast<int*>(meta), tid, total);
  for (int i = i_begin; i < i_end; ++i) pref[i] += offset;
  if (tid == 0) pref[gr] = total;
  if (total == 0) return;  // block-uniform
  __syncthreads();

  const int l = tid % kChunks;
  for (int base = 0; base < total; base += a.cap) {
    const int er = min(a.cap, total - base);
    const int per = (er + kSdThreads - 1) / kSdThreads;  // <= kSdRun
    const int my0 = tid * per;
    const int mine = max(0, min(per, er - my0));

    // meta[j * kSdThreads + owner] = (row << 16) | column - w0 of the owner's j-th entry; one
    // thread per entry (coalesced reads of cols).
    for (int u = tid; u < er; u += kSdThreads) {
      const int v = base + u;
      int lo = 0, hi = gr;  // pref[lo] <= v < pref[hi]
      while (hi - lo > 1) {
        const int mid = (lo + hi) >> 1;
        if (pref[mid] <= v) {
          lo = mid;
        } else {
          hi = mid;
        }
      }
      const int64_t t = row_lo[lo] + (v - pref[lo]);
      const int c = static_cast<int>(a.cols[t] - w0);
      const int owner = u / per, j = u - owner * per;
      meta[j * kSdThreads + owner] = (static_cast<uint32_t>(lo) << 16) | static_cast<uint32_t>(c);
    }
    __syncthreads();

    Acc acc[kSdRun];
#pragma unroll
    for (int j = 0; j < kSdRun; ++j) acc[j] = Acc(0);
    for (int64_t n0 = n_begin; n0 < n_end; n0 += TOK) {
      stage_tile<T>(a.x, a.in, n0, n_end, w0, wr, a.x_vec, xs, tid, kSdThreads);
      stage_tile<T>(a.dy, a.out, n0, n_end, r0, gr, a.dy_vec, dys, tid, kSdThreads);
      __syncthreads();
      int cur = -1;
      uint4 dyr[kChunks];
#pragma unroll
      for (int k = 0; k < kChunks; ++k) dyr[k] = make_uint4(0u, 0u, 0u, 0u);
#pragma unroll
      for (int j = 0; j < kSdRun; ++j) {
        if (j < mine) {
          const uint32_t m = meta[j * kSdThreads + tid];
          const int i = static_cast<int>(m >> 16), c = static_cast<int>(m & 0xffffu);
          if (i != cur) {
            cur = i;
            const unsigned char* yrow = dys + static_cast<int64_t>(i) * kRowBytes;
#pragma unroll
            for (int k = 0; k < kChunks; ++k) dyr[k] = lds16(yrow + ((k + l) % kChunks) * 16);
          }
          const unsigned char* xrow = xs + static_cast<int64_t>(c) * kRowBytes;
          Acc d[kChunks];
#pragma unroll
          for (int k = 0; k < kChunks; ++k) {
            d[k] = chunk_dot<T>(lds16(xrow + ((k + l) % kChunks) * 16), dyr[k]);
          }
          acc[j] = add_rn(acc[j], tree8(d));
        }
      }
      __syncthreads();  // the next tile overwrites xs / dys
    }

    // Out through shared memory, so that consecutive threads write consecutive entries.
#pragma unroll
    for (int j = 0; j < kSdRun; ++j) {
      if (j < mine) sums[my0 + j] = acc[j];
    }
    __syncthreads();
    for (int u = tid; u < er; u += kSdThreads) {
      const int owner = u / per, j = u - owner * per;
      const int i = static_cast<int>(meta[j * kSdThreads + owner] >> 16);
      const int64_t t = row_lo[i] + (base + u - pref[i]);
      if (a.partial != nullptr) {
        a.partial[static_cast<int64_t>(blockIdx.y) * a.nnz + t] = sums[u];
      } else {
        a.dv[t] = Elem<T>::store(sums[u]);
      }
    }
    __syncthreads();  // the next round rebuilds meta and reuses the tile area
  }
}

// One thread per (entry, slice), grid-stride; the same arithmetic as the tile kernel.
template <typename T>
__global__ void __launch_bounds__(kSdDirectThreads)
    sddmm_direct_kernel(const SdArgs<T> a, int64_t slices) {
  using Acc = AccT<T>;
  constexpr int V = kVec<T>;
  constexpr int TOK = kTok<T>;
  const int64_t total = a.nnz * slices;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kSdDirectThreads;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * kSdDirectThreads + threadIdx.x; e < total;
       e += stride) {
    const int64_t s = e / a.nnz, t = e - s * a.nnz;
    const T* xc = a.x + a.cols[t];
    const T* yr = a.dy + a.rows[t];
    const int64_t n_begin = s * a.slice_len, n_end = min64(a.N, n_begin + a.slice_len);
    Acc acc = Acc(0);
    for (int64_t n0 = n_begin; n0 < n_end; n0 += TOK) {
      Acc d[kChunks];
#pragma unroll
      for (int q = 0; q < kChunks; ++q) {
        Acc sum = Acc(0);
        // Not unrolled: hoisting all 16V strided loads would only spill.
#pragma unroll 1
        for (int i = 0; i < V; ++i) {
          const int64_t n = n0 + q * V + i;
          const Acc xv = n < n_end ? Elem<T>::load(xc[n * a.in]) : Acc(0);
          const Acc yv = n < n_end ? Elem<T>::load(yr[n * a.out]) : Acc(0);
          sum = i == 0 ? mul_rn(xv, yv) : fma_rn(xv, yv, sum);
        }
        d[q] = sum;
      }
      acc = add_rn(acc, tree8(d));
    }
    if (a.partial != nullptr) {
      a.partial[s * a.nnz + t] = acc;
    } else {
      a.dv[t] = Elem<T>::store(acc);
    }
  }
}

// dv[t] = sum over slices of partial[slice][t], in slice order (kept in double, as block_outer).
template <typename T>
__global__ void __launch_bounds__(kReduceThreads)
    sddmm_reduce_kernel(const AccT<T>* __restrict__ partial, T* __restrict__ dv, int64_t nnz,
                        int64_t slices) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kReduceThreads;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * kReduceThreads + threadIdx.x; t < nnz;
       t += stride) {
    double sum = 0.0;
    for (int64_t s = 0; s < slices; ++s) sum += static_cast<double>(partial[s * nnz + t]);
    dv[t] = Elem<T>::store_double(sum);  // one rounding (via float it could be off by an ulp)
  }
}

// Token slices: a function of the shape only (never of the device), so the summation order, hence
// the result, is the same on every run and GPU; the workspace size follows it.
void sd_slices(const SparseDeltaGradParams& p, int tok, SdPlan& plan) {
  const int64_t nnz = p.pattern.nnz;
  int64_t want = ceil_div(kSdTargetBlocks, max64(1, nnz / kSdEstTileEntries));
  want = min64(want, max64(1, p.N / kSdMinSliceTokens));
  want = min64(want, kSdMaxSlices);
  want = min64(want, max64(1, kSdMaxPartialElems / max64(1, nnz)));
  want = max64(want, 1);
  plan.slice_len = ceil_div(ceil_div(p.N, want), tok) * tok;
  plan.slices = ceil_div(p.N, plan.slice_len);
}

// The execution of the tile kernel for `smem_limit` bytes of shared memory per block: G + W as
// large as fits (each staged x value serves the tile's entries in its column, so bigger tiles
// cost less L2 traffic per FMA), about kSdFill rounds' worth of entries at the average density,
// and the direct kernel where the tiles would hold too few entries to pay for their staging.
void sd_tiles(const SparseDeltaGradParams& p, int64_t elem_size, int64_t acc_size,
              int64_t smem_limit, SdPlan& plan) {
  const int64_t out = p.pattern.out, in = p.pattern.in, nnz = p.pattern.nnz;
  auto round8 = [](int64_t v) { return (v + 7) / 8 * 8; };
  auto floor8 = [](int64_t v) { return max64(8, v / 8 * 8); };
  int cap = kSdMaxCap;
  int64_t features = 0;  // G + W
  for (;;) {
    // staged rows, meta, row_lo and pref per G row: at most kRowBytes + 12 bytes per feature.
    const int64_t fixed = int64_t{cap} * 4 + 64;
    features = (smem_limit - fixed) / (kRowBytes + 12);
    // A round's cap sums reuse the staged rows' area (sd_layout), which must hold them too.
    const bool sums_fit = int64_t{cap} * acc_size + fixed + features * 12 <= smem_limit;
    if ((features >= 64 && sums_fit) || cap == kSdMinCap) break;
    cap /= 2;
  }
  features = min64(max64(features, 16), 2 * int64_t{kSdMaxFeatures});
  int64_t W = min64(round8(in), max64(8, floor8(features / 2)));
  int64_t G = min64(round8(out), max64(8, floor8(features - W)));
  W = min64(round8(in), max64(8, floor8(features - G)));  // what G left over
  G = min64(G, kSdMaxFeatures);
  W = min64(W, kSdMaxFeatures);
  const double density = static_cast<double>(nnz) / (static_cast<double>(out) * in);
  const double area = kSdFill * cap / density;
  if (static_cast<double>(G) * W > area) {
    const double s = std::sqrt(area / (static_cast<double>(G) * W));
    G = floor8(static_cast<int64_t>(G * s));
    W = floor8(static_cast<int64_t>(W * s));
    if (static_cast<double>(G) * W > area) W = floor8(static_cast<int64_t>(area / G));
    if (static_cast<double>(G) * W > area) G = floor8(static_cast<int64_t>(area / W));
  }
  plan.G = static_cast<int>(G);
  plan.W = static_cast<int>(W);
  plan.cap = cap;
  plan.ngroups = ceil_div(out, G);
  plan.nwin = ceil_div(in, W);
  plan.smem = sd_layout(plan.G, plan.W, cap, acc_size).bytes;
  // Per token: a non-empty tile stages G + W features; the direct kernel reads two 32-byte
  // sectors per entry.
  const double tiles = static_cast<double>(plan.ngroups) * static_cast<double>(plan.nwin);
  const double staged = (tiles < nnz ? tiles : static_cast<double>(nnz)) * (G + W) * elem_size;
  const double direct = static_cast<double>(nnz) * 64.0;
  plan.direct = tiles > static_cast<double>(kMaxGridX) || plan.smem > smem_limit ||
                staged > direct;
}

template <typename T>
void sddmm_run(const SparseDeltaGradParams& p, void* workspace, cudaStream_t stream,
               const SdPlan& plan) {
  using Acc = AccT<T>;
  const SparseDeltaPattern& pat = p.pattern;
  SdArgs<T> a;
  a.row_ptr = pat.row_ptr;
  a.rows = pat.rows;
  a.cols = pat.cols;
  a.dy = static_cast<const T*>(p.dy);
  a.x = static_cast<const T*>(p.x);
  a.partial = plan.slices > 1 ? static_cast<Acc*>(workspace) : nullptr;
  a.dv = static_cast<T*>(p.dvalues);
  a.out = pat.out;
  a.in = pat.in;
  a.N = p.N;
  a.nnz = pat.nnz;
  a.slice_len = plan.slice_len;
  a.nwin = plan.nwin;
  a.G = plan.G;
  a.W = plan.W;
  a.cap = plan.cap;
  const SdLayout layout = sd_layout(plan.G, plan.W, plan.cap, sizeof(Acc));
  a.meta_off = layout.meta;
  a.row_lo_off = layout.row_lo;
  a.pref_off = layout.pref;
  a.x_vec = aligned16(p.x) && pat.in % kVec<T> == 0;
  a.dy_vec = aligned16(p.dy) && pat.out % kVec<T> == 0;
  if (plan.direct) {
    const int64_t blocks = min64(ceil_div(pat.nnz * plan.slices, kSdDirectThreads), 65536);
    auto kernel = sddmm_direct_kernel<T>;
    kernel<<<static_cast<unsigned>(blocks), kSdDirectThreads, 0, stream>>>(a, plan.slices);
  } else {
    auto kernel = sddmm_tile_kernel<T>;
    // Raised to the device maximum, not to this plan's size: a concurrent launch of the same
    // kernel with a smaller plan cannot lower it under this one.
    if (plan.smem > kDefaultSmem &&
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             static_cast<int>(plan.smem_limit)) != cudaSuccess) {
      return;  // the error is left for the caller's cudaGetLastError()
    }
    const dim3 grid(static_cast<unsigned>(plan.ngroups * plan.nwin),
                    static_cast<unsigned>(plan.slices));
    kernel<<<grid, kSdThreads, static_cast<size_t>(plan.smem), stream>>>(a);
  }
  if (plan.slices > 1) {
    const int64_t blocks = min64(ceil_div(pat.nnz, kReduceThreads), 65536);
    auto kernel = sddmm_reduce_kernel<T>;
    kernel<<<static_cast<unsigned>(blocks), kReduceThreads, 0, stream>>>(
        static_cast<const Acc*>(workspace), a.dv, pat.nnz, plan.slices);
  }
}

template <typename T>
void sddmm_launch(const SparseDeltaGradParams& p, void* workspace, cudaStream_t stream) {
  int device = 0, optin = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) !=
          cudaSuccess) {
    return;
  }
  SdPlan plan;
  sd_slices(p, kTok<T>, plan);
  plan.smem_limit = optin > kDefaultSmem ? optin : kDefaultSmem;
  sd_tiles(p, sizeof(T), sizeof(AccT<T>), plan.smem_limit, plan);
  sddmm_run<T>(p, workspace, stream, plan);
}

int tok_for(DType dtype) {
  switch (dtype) {
    case DType::kFloat64: return kChunks * 2;
    case DType::kFloat32: return kChunks * 4;
    default: return kChunks * 8;
  }
}

int64_t acc_bytes(DType dtype) { return dtype == DType::kFloat64 ? 8 : 4; }

}  // namespace

int64_t sparse_delta_matmul_cuda_workspace_bytes(const SparseDeltaMatmulParams&) { return 0; }

void sparse_delta_matmul_cuda(const SparseDeltaMatmulParams& p, void*, cudaStream_t stream) {
  if (p.N <= 0 || p.pattern.nnz <= 0) return;
  switch (p.dtype) {
    case DType::kFloat32:
      return p.transpose ? spmm_launch<float, true>(p, stream) : spmm_launch<float, false>(p, stream);
    case DType::kFloat64:
      return p.transpose ? spmm_launch<double, true>(p, stream)
                         : spmm_launch<double, false>(p, stream);
    case DType::kFloat16:
      return p.transpose ? spmm_launch<__half, true>(p, stream)
                         : spmm_launch<__half, false>(p, stream);
    case DType::kBFloat16:
      return p.transpose ? spmm_launch<__nv_bfloat16, true>(p, stream)
                         : spmm_launch<__nv_bfloat16, false>(p, stream);
  }
}

int64_t sparse_delta_grad_cuda_workspace_bytes(const SparseDeltaGradParams& p) {
  if (p.N <= 0 || p.pattern.nnz <= 0) return 0;
  SdPlan plan;
  sd_slices(p, tok_for(p.dtype), plan);
  return plan.slices > 1 ? plan.slices * p.pattern.nnz * acc_bytes(p.dtype) : 0;
}

void sparse_delta_grad_cuda(const SparseDeltaGradParams& p, void* workspace, cudaStream_t stream) {
  if (p.pattern.nnz <= 0) return;
  if (p.N <= 0) {  // an empty sum, as the CPU kernel writes it
    const int64_t bytes = p.dtype == DType::kFloat64 ? 8 : (p.dtype == DType::kFloat32 ? 4 : 2);
    cudaMemsetAsync(p.dvalues, 0, static_cast<size_t>(p.pattern.nnz * bytes), stream);
    return;
  }
  switch (p.dtype) {
    case DType::kFloat32: sddmm_launch<float>(p, workspace, stream); break;
    case DType::kFloat64: sddmm_launch<double>(p, workspace, stream); break;
    case DType::kFloat16: sddmm_launch<__half>(p, workspace, stream); break;
    case DType::kBFloat16: sddmm_launch<__nv_bfloat16>(p, workspace, stream); break;
  }
}

}  // namespace peft_kernels
