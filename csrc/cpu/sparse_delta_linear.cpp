// CPU kernels of the sparse delta (see csrc/kernels/sparse_delta_linear.h).
//
// Both kernels work on tiles of kTile tokens transposed to feature-major ([features][kTile]), so
// one entry of Delta costs a few vector loads and FMAs across the tile's tokens instead of kTile
// strided scalar accesses (x[n, c] for the tile's tokens is one contiguous 128-byte row of the
// transposed tile). The transpositions are 8 x 8 register transposes (AVX2) and cost about as
// much as one read and one write of the activations.
//   matmul: per tile, every destination feature (output row, or input column for the transposed
//           product) gathers sum_t v_t * src_t over its entries into a row of a transposed
//           output tile, which is then transposed back and added into y.
//   grad:   per tile, acc[t] += dy_tile[r_t] * x_tile[c_t] lane-wise (one 8-lane accumulator per
//           entry, summed across lanes once at the end). Tokens are split into a fixed number of
//           chunks whose partial sums are added in chunk order, so the result does not depend on
//           the number of threads.
#include "kernels/sparse_delta_linear.h"
#include "cpu/cpu_features.h"
#include "cpu/simd.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define PK_SPARSE_AVX2 1
#endif

namespace peft_kernels {
namespace {

constexpr int64_t kTile = 32;  // tokens per tile
// grad: token chunks with their own partial sums; at most this many partial values in total.
constexpr int64_t kGradChunks = 16;
constexpr int64_t kMaxPartial = int64_t{1} << 24;

// 32-byte vectors (one AVX register, csrc/cpu/simd.h): 8 floats or 4 doubles; kTile / kLanes of
// them per tile row.
template <typename T>
using V = cpu::Vec<T>;
using cpu::kLanes;
template <typename T>
constexpr int64_t kParts = kTile / kLanes<T>;

#define PK_INLINE PK_SIMD_INLINE

template <typename T>
PK_INLINE V<T> vload(const T* p) {
  return cpu::load(p);
}
template <typename T>
PK_INLINE void vstore(T* p, V<T> v) {
  cpu::store(p, v);
}

// ---------------------------------------------------------------------------------------------
// Transpositions between token-major [count][ld] rows and a feature-major tile [features][kTile].

// dst[f * kTile + j] = src[(n0 + j) * ld + f], zero for j >= count.
template <typename T>
void tile_in_scalar(const T* src, int64_t ld, int64_t n0, int64_t count, int64_t f_begin,
                    int64_t f_end, T* dst) {
  for (int64_t f = f_begin; f < f_end; ++f) {
    for (int64_t j = 0; j < kTile; ++j) dst[f * kTile + j] = j < count ? src[(n0 + j) * ld + f] : T(0);
  }
}

// y[(n0 + j) * ld + d] += tile[d * kTile + j] for j < count.
template <typename T>
void tile_out_scalar(const T* tile, int64_t ld, int64_t n0, int64_t count, int64_t d_begin,
                     int64_t d_end, T* y) {
  for (int64_t j = 0; j < count; ++j) {
    T* row = y + (n0 + j) * ld;
    for (int64_t d = d_begin; d < d_end; ++d) row[d] += tile[d * kTile + j];
  }
}

#ifdef PK_SPARSE_AVX2
#define PK_AVX2_FN __attribute__((target("avx2,fma")))
#define PK_AVX2_INLINE __attribute__((target("avx2,fma"), always_inline)) inline

PK_AVX2_INLINE void transpose8(__m256 (&r)[8]) {
  const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
  const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  const __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  r[0] = _mm256_permute2f128_ps(s0, s4, 0x20);
  r[1] = _mm256_permute2f128_ps(s1, s5, 0x20);
  r[2] = _mm256_permute2f128_ps(s2, s6, 0x20);
  r[3] = _mm256_permute2f128_ps(s3, s7, 0x20);
  r[4] = _mm256_permute2f128_ps(s0, s4, 0x31);
  r[5] = _mm256_permute2f128_ps(s1, s5, 0x31);
  r[6] = _mm256_permute2f128_ps(s2, s6, 0x31);
  r[7] = _mm256_permute2f128_ps(s3, s7, 0x31);
}

PK_AVX2_FN void tile_in_avx2(const float* src, int64_t ld, int64_t n0, int64_t count,
                             int64_t features, float* dst) {
  const int64_t f_full = features / 8 * 8;
  const __m256 zero = _mm256_setzero_ps();
  // Eight token rows at a time, swept along the features: each row is read as one sequential
  // stream. Features outermost instead revisits kTile rows a row stride apart (a multiple of
  // 4 KiB for power-of-two widths, all in one L1 set), and measured 2.1x slower.
  for (int64_t j0 = 0; j0 < kTile; j0 += 8) {
    for (int64_t f0 = 0; f0 < f_full; f0 += 8) {
      __m256 r[8];
      for (int i = 0; i < 8; ++i) {
        r[i] = j0 + i < count ? _mm256_loadu_ps(src + (n0 + j0 + i) * ld + f0) : zero;
      }
      transpose8(r);
      for (int i = 0; i < 8; ++i) _mm256_storeu_ps(dst + (f0 + i) * kTile + j0, r[i]);
    }
  }
  tile_in_scalar(src, ld, n0, count, f_full, features, dst);
}

PK_AVX2_FN void tile_out_avx2(const float* tile, int64_t ld, int64_t n0, int64_t count,
                              int64_t dests, float* y) {
  const int64_t d_full = dests / 8 * 8;
  for (int64_t j0 = 0; j0 < count; j0 += 8) {  // token rows outermost, as in tile_in_avx2
    for (int64_t d0 = 0; d0 < d_full; d0 += 8) {
      __m256 r[8];
      for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(tile + (d0 + i) * kTile + j0);
      transpose8(r);
      for (int i = 0; i < 8 && j0 + i < count; ++i) {
        float* out = y + (n0 + j0 + i) * ld + d0;
        _mm256_storeu_ps(out, _mm256_add_ps(_mm256_loadu_ps(out), r[i]));
      }
    }
  }
  tile_out_scalar(tile, ld, n0, count, d_full, dests, y);
}

using cpu::have_avx2_fma;
#else
#define PK_AVX2_FN
#endif

template <typename T>
void tile_in(const T* src, int64_t ld, int64_t n0, int64_t count, int64_t features, T* dst) {
#ifdef PK_SPARSE_AVX2
  if constexpr (std::is_same_v<T, float>) {
    if (have_avx2_fma()) return tile_in_avx2(src, ld, n0, count, features, dst);
  }
#endif
  tile_in_scalar(src, ld, n0, count, int64_t{0}, features, dst);
}

template <typename T>
void tile_out(const T* tile, int64_t ld, int64_t n0, int64_t count, int64_t dests, T* y) {
#ifdef PK_SPARSE_AVX2
  if constexpr (std::is_same_v<T, float>) {
    if (have_avx2_fma()) return tile_out_avx2(tile, ld, n0, count, dests, y);
  }
#endif
  tile_out_scalar(tile, ld, n0, count, int64_t{0}, dests, y);
}

// ---------------------------------------------------------------------------------------------
// matmul. ptr [dests + 1] delimits each destination feature's entries; entry e of destination d
// is order[e] (or e when order is null); src_feature[t] names its source feature.
struct Gather {
  int64_t dests = 0, sources = 0;
  const int64_t* ptr = nullptr;
  const int32_t* order = nullptr;
  const int32_t* src_feature = nullptr;
};

// out[d] = sum over d's entries of v_t * xt[src_t], for every destination d (rows of kTile).
template <typename T>
PK_INLINE void gather_body(const Gather& g, const T* values, const T* xt, T* out) {
  for (int64_t d = 0; d < g.dests; ++d) {
    const int64_t begin = g.ptr[d], end = g.ptr[d + 1];
    V<T> acc[kParts<T>];
    for (int64_t q = 0; q < kParts<T>; ++q) acc[q] = V<T>{};
    for (int64_t e = begin; e < end; ++e) {
      const int64_t t = g.order != nullptr ? g.order[e] : e;
      const T v = values[t];
      const T* src = xt + static_cast<int64_t>(g.src_feature[t]) * kTile;
      for (int64_t q = 0; q < kParts<T>; ++q) acc[q] += v * vload(src + q * kLanes<T>);
    }
    for (int64_t q = 0; q < kParts<T>; ++q) vstore(out + d * kTile + q * kLanes<T>, acc[q]);
  }
}

// acc[t * kLanes + lane] += sum over the tile's parts of dyt[r_t] * xt[c_t], entries [0, nnz).
template <typename T>
PK_INLINE void grad_body(const SparseDeltaPattern& pat, const T* dyt, const T* xt, T* acc) {
  for (int64_t t = 0; t < pat.nnz; ++t) {
    const T* a = dyt + static_cast<int64_t>(pat.rows[t]) * kTile;
    const T* b = xt + static_cast<int64_t>(pat.cols[t]) * kTile;
    V<T> sum = vload(acc + t * kLanes<T>);
    for (int64_t q = 0; q < kParts<T>; ++q) sum += vload(a + q * kLanes<T>) * vload(b + q * kLanes<T>);
    vstore(acc + t * kLanes<T>, sum);
  }
}

template <typename T>
void gather_generic(const Gather& g, const T* values, const T* xt, T* out) {
  gather_body(g, values, xt, out);
}
template <typename T>
void grad_generic(const SparseDeltaPattern& pat, const T* dyt, const T* xt, T* acc) {
  grad_body(pat, dyt, xt, acc);
}
#ifdef PK_SPARSE_AVX2
template <typename T>
PK_AVX2_FN void gather_avx2(const Gather& g, const T* values, const T* xt, T* out) {
  gather_body(g, values, xt, out);
}
template <typename T>
PK_AVX2_FN void grad_avx2(const SparseDeltaPattern& pat, const T* dyt, const T* xt, T* acc) {
  grad_body(pat, dyt, xt, acc);
}
#endif

template <typename T>
void gather(const Gather& g, const T* values, const T* xt, T* out) {
#ifdef PK_SPARSE_AVX2
  if (have_avx2_fma()) return gather_avx2(g, values, xt, out);
#endif
  gather_generic(g, values, xt, out);
}

template <typename T>
void grad_tile(const SparseDeltaPattern& pat, const T* dyt, const T* xt, T* acc) {
#ifdef PK_SPARSE_AVX2
  if (have_avx2_fma()) return grad_avx2(pat, dyt, xt, acc);
#endif
  grad_generic(pat, dyt, xt, acc);
}

template <typename T>
void matmul_impl(const SparseDeltaMatmulParams& p) {
  const SparseDeltaPattern& pat = p.pattern;
  if (p.N == 0 || pat.nnz == 0) return;
  Gather g;
  if (p.transpose) {
    g.dests = pat.in;
    g.sources = pat.out;
    g.ptr = pat.col_ptr;
    g.order = pat.col_order;
    g.src_feature = pat.rows;
  } else {
    g.dests = pat.out;
    g.sources = pat.in;
    g.ptr = pat.row_ptr;
    g.src_feature = pat.cols;
  }
  const T* x = static_cast<const T*>(p.x);
  const T* values = static_cast<const T*>(p.values);
  T* y = static_cast<T*>(p.y);
  const int64_t tiles = (p.N + kTile - 1) / kTile;
  at::parallel_for(0, tiles, 1, [&](int64_t tile_begin, int64_t tile_end) {
    std::vector<T> xt(static_cast<size_t>(g.sources * kTile));
    std::vector<T> yt(static_cast<size_t>(g.dests * kTile));
    for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
      const int64_t n0 = tile * kTile, count = std::min(kTile, p.N - n0);
      tile_in(x, g.sources, n0, count, g.sources, xt.data());
      gather(g, values, xt.data(), yt.data());
      tile_out(yt.data(), g.dests, n0, count, g.dests, y);
    }
  });
}

template <typename T>
void grad_impl(const SparseDeltaGradParams& p) {
  const SparseDeltaPattern& pat = p.pattern;
  T* dvalues = static_cast<T*>(p.dvalues);
  if (pat.nnz == 0) return;
  if (p.N == 0) {
    std::fill(dvalues, dvalues + pat.nnz, T(0));
    return;
  }
  const T* dy = static_cast<const T*>(p.dy);
  const T* x = static_cast<const T*>(p.x);
  constexpr int64_t L = kLanes<T>;
  const int64_t tiles = (p.N + kTile - 1) / kTile;
  // Chunks of whole tiles; their number depends on the shape only.
  int64_t chunks = std::min({kGradChunks, tiles, std::max<int64_t>(1, kMaxPartial / (pat.nnz * L))});
  const int64_t tiles_per_chunk = (tiles + chunks - 1) / chunks;
  chunks = (tiles + tiles_per_chunk - 1) / tiles_per_chunk;
  std::vector<T> partial(static_cast<size_t>(chunks * pat.nnz * L), T(0));
  at::parallel_for(0, chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
    std::vector<T> dyt(static_cast<size_t>(pat.out * kTile)), xt(static_cast<size_t>(pat.in * kTile));
    for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
      T* acc = partial.data() + chunk * pat.nnz * L;
      const int64_t tile_last = std::min(tiles, (chunk + 1) * tiles_per_chunk);
      for (int64_t tile = chunk * tiles_per_chunk; tile < tile_last; ++tile) {
        const int64_t n0 = tile * kTile, count = std::min(kTile, p.N - n0);
        tile_in(dy, pat.out, n0, count, pat.out, dyt.data());
        tile_in(x, pat.in, n0, count, pat.in, xt.data());
        grad_tile(pat, dyt.data(), xt.data(), acc);
      }
    }
  });
  at::parallel_for(0, pat.nnz, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      T sum = T(0);
      for (int64_t chunk = 0; chunk < chunks; ++chunk) {
        const T* lanes = partial.data() + (chunk * pat.nnz + t) * L;
        for (int64_t lane = 0; lane < L; ++lane) sum += lanes[lane];
      }
      dvalues[t] = sum;
    }
  });
}

}  // namespace

void sparse_delta_matmul_cpu(const SparseDeltaMatmulParams& p) {
  switch (p.dtype) {
    case DType::kFloat32: return matmul_impl<float>(p);
    case DType::kFloat64: return matmul_impl<double>(p);
    default: TORCH_CHECK(false, "sparse_delta_linear: CPU kernels take float32 or float64");
  }
}

void sparse_delta_grad_cpu(const SparseDeltaGradParams& p) {
  switch (p.dtype) {
    case DType::kFloat32: return grad_impl<float>(p);
    case DType::kFloat64: return grad_impl<double>(p);
    default: TORCH_CHECK(false, "sparse_delta_linear: CPU kernels take float32 or float64");
  }
}

}  // namespace peft_kernels
