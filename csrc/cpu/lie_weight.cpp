// CPU kernels of the Lie-group Hadamard adapter (see csrc/kernels/lie_weight.h). Register-tiled
// over kRowTile output rows x one vector of columns: D = s B A for that tile is r vector FMAs per
// row with each A vector loaded once for all the tile's rows, then exp (or 1 + D) and the Hadamard
// product in registers, so the out x K update is never formed. The grad kernel writes the tile's
// M = G * W * factor to a kRowTile x K buffer that stays in L1/L2, then reduces it into dB (vector
// dot products) and a per-chunk dA partial (vector axpys) in one sweep per kRankTile ranks. The
// row loops are compiled twice, for baseline x86-64 and for AVX2 + FMA (chosen at run time), with
// a vectorised exp; vectors are GCC vector extensions, so the code carries no intrinsics.
#include "kernels/lie_weight.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "cpu/cpu_features.h"
#include "cpu/simd.h"

namespace peft_kernels {
namespace {

using cpu::load;
using cpu::load_part;
using cpu::store;
using cpu::store_part;
using cpu::Vec;

// dA's row sums go into this many fixed row chunks, added in order at the end: the result does
// not depend on the number of threads.
constexpr int64_t kGradChunks = 16;

// exp over 32-byte vectors (element-wise selects, no control flow).
template <typename T>
struct ExpTraits;
template <>
struct ExpTraits<float> : cpu::VecTraits<float> {
  static constexpr int kDegree = 7;  // |t| <= ln2/2: truncation 5e-9 < 2^-24
  static constexpr float kLo = -104.0f, kHi = 89.0f;  // beyond: 0 and inf after scaling
  static constexpr float kRound = 12582912.0f;        // 1.5 * 2^23: x + kRound - kRound = rint(x)
  static constexpr int kMantissa = 23, kBias = 127;
};
template <>
struct ExpTraits<double> : cpu::VecTraits<double> {
  static constexpr int kDegree = 13;  // truncation 4e-18 < 2^-53
  static constexpr double kLo = -746.0, kHi = 710.0;
  static constexpr double kRound = 6755399441055744.0;  // 1.5 * 2^52
  static constexpr int kMantissa = 52, kBias = 1023;
};

// x = exp(x), lane-wise: 2^n * p(t), x = n ln2 + t (Cody-Waite, ln2 split in two), p the Taylor
// polynomial of degree kDegree; 2^n applied as two factors built from exponent bits, so that n
// up to the overflow threshold stays in range. NaN stays NaN; beyond the clamps the scaling
// overflows to inf or underflows to 0.
template <typename T>
PK_SIMD_INLINE void exp_vec(typename ExpTraits<T>::V& x) {
  using E = ExpTraits<T>;
  using V = typename E::V;
  using I = typename E::I;
  const V zero = {};
  const V lo = zero + E::kLo, hi = zero + E::kHi;
  V safe = x < lo ? lo : x;
  safe = safe > hi ? hi : safe;
  safe = safe == safe ? safe : zero;  // a NaN never reaches the int conversion
  const V n = (safe * T(1.4426950408889634) + E::kRound) - E::kRound;
  const V t = (safe - n * T(0.693145751953125)) - n * T(1.4286068203094172e-06);
  V p = zero + T(1);
  for (int k = E::kDegree; k >= 1; --k) p = T(1) + p * t * (T(1) / T(k));
  const I ni = __builtin_convertvector(n, I), half = ni >> 1;  // floor(n / 2)
  const V scale1 = (V)((half + E::kBias) << E::kMantissa);
  const V scale2 = (V)((ni - half + E::kBias) << E::kMantissa);
  const V result = p * scale1 * scale2;
  x = x == x ? result : x;
}

// Rows handled together: each A vector loaded serves this many rows.
constexpr int kRowTile = 4;
// Ranks reduced together in grad's second pass (kRowTile x kRankTile vector accumulators).
constexpr int kRankTile = 2;
// Column vectors per tile in the D product (kRowTile x kColVectors accumulators).
constexpr int kColVectors = 2;

// Operands shared by both kernels. A is copied to Ap [r, Kp] with Kp = K rounded up to whole
// kColVectors-vector tiles and zero columns past K, so the rank loops never need a partial vector of A.
template <typename T>
struct RowOperands {
  const T *W, *Ap, *B;
  int64_t K, Kp, r;
  T s;
  bool first_order;
};

// f[i][c] = factor of row o + i at the vector of columns k + c L: exp(s B[row] A[:, ..]) or
// 1 + that (sb[i] = s B[o + i, :]).
template <typename T, int NR>
PK_SIMD_INLINE void factor_vectors(const RowOperands<T>& a, const T* const* sb, int64_t k,
                                  Vec<T> (*f)[kColVectors]) {
  constexpr int L = ExpTraits<T>::kLanes;
  for (int i = 0; i < NR; ++i) {
    for (int c = 0; c < kColVectors; ++c) f[i][c] = Vec<T>{};
  }
  for (int64_t j = 0; j < a.r; ++j) {
    Vec<T> av[kColVectors];
    for (int c = 0; c < kColVectors; ++c) av[c] = load(a.Ap + j * a.Kp + k + c * L);
    for (int i = 0; i < NR; ++i) {
      const T b = sb[i][j];
      for (int c = 0; c < kColVectors; ++c) f[i][c] += b * av[c];
    }
  }
  for (int i = 0; i < NR; ++i) {
    for (int c = 0; c < kColVectors; ++c) {
      if (a.first_order) {
        f[i][c] += T(1);
      } else {
        exp_vec<T>(f[i][c]);
      }
    }
  }
}

// s * B[row, :] for NR rows starting at o, into sb_store (NR x r) and row pointers sb.
template <typename T, int NR>
PK_SIMD_INLINE void scaled_b(const RowOperands<T>& a, int64_t o, T* sb_store, const T** sb) {
  for (int i = 0; i < NR; ++i) {
    for (int64_t j = 0; j < a.r; ++j) sb_store[i * a.r + j] = a.s * a.B[(o + i) * a.r + j];
    sb[i] = sb_store + i * a.r;
  }
}

// out rows [o, o + NR) = W * factor, kColVectors vectors of columns at a time with D in
// registers.
template <typename T, int NR>
PK_SIMD_INLINE void generate_tile(const RowOperands<T>& a, T* out, int64_t o, T* sb_store) {
  constexpr int L = ExpTraits<T>::kLanes;
  const T* sb[NR];
  scaled_b<T, NR>(a, o, sb_store, sb);
  for (int64_t k = 0; k < a.K; k += kColVectors * L) {
    Vec<T> f[NR][kColVectors];
    factor_vectors<T, NR>(a, sb, k, f);
    for (int c = 0; c < kColVectors; ++c) {
      const int64_t kc = k + c * L, n = std::min<int64_t>(L, a.K - kc);
      for (int i = 0; i < NR; ++i) {
        const T* w = a.W + (o + i) * a.K + kc;
        T* y = out + (o + i) * a.K + kc;
        if (n == L) {
          store(y, f[i][c] * load(w));
        } else if (n > 0) {
          store_part(y, f[i][c] * load_part(w, n), n);
        }
      }
    }
  }
}

template <typename T>
PK_SIMD_INLINE void generate_rows_body(const RowOperands<T>& a, T* out, int64_t begin,
                                      int64_t end) {
  std::vector<T> sb_store(static_cast<size_t>(kRowTile * a.r));
  int64_t o = begin;
  for (; o + kRowTile <= end; o += kRowTile) generate_tile<T, kRowTile>(a, out, o, sb_store.data());
  for (; o < end; ++o) generate_tile<T, 1>(a, out, o, sb_store.data());
}

template <typename T>
struct GradArgs {
  RowOperands<T> op;
  const T* G;
  T *dB, *partial;  // partial: per chunk, dA [r, Kp]
  int64_t rows, chunk_rows;
};

// Rows [o, o + NR): M = G * W * factor (pass 1, into m [NR, Kp], zero past K), then
// dB[row, j] = s sum_k M[row, k] A[j, k] and dA[j, :] += sum_rows s B[row, j] M[row, :]
// (pass 2, kRankTile ranks per sweep over m).
template <typename T, int NR>
PK_SIMD_INLINE void grad_tile(const GradArgs<T>& g, T* dA, int64_t o, T* m, T* sb_store) {
  constexpr int L = ExpTraits<T>::kLanes;
  const RowOperands<T>& a = g.op;
  const int64_t K = a.K, Kp = a.Kp, r = a.r;
  const T* sb[NR];
  scaled_b<T, NR>(a, o, sb_store, sb);
  for (int64_t k = 0; k < Kp; k += kColVectors * L) {
    Vec<T> f[NR][kColVectors];
    if (!a.first_order) factor_vectors<T, NR>(a, sb, k, f);
    for (int c = 0; c < kColVectors; ++c) {
      const int64_t kc = k + c * L, n = std::max<int64_t>(0, std::min<int64_t>(L, K - kc));
      for (int i = 0; i < NR; ++i) {
        const int64_t at = (o + i) * K + kc;
        Vec<T> gw = {};  // zero past K: adds nothing in pass 2
        if (n == L) {
          gw = load(g.G + at) * load(a.W + at);
        } else if (n > 0) {
          gw = load_part(g.G + at, n) * load_part(a.W + at, n);
        }
        store(m + i * Kp + kc, a.first_order ? gw : gw * f[i][c]);
      }
    }
  }
  for (int64_t j0 = 0; j0 < r; j0 += kRankTile) {
    const int nj = static_cast<int>(std::min<int64_t>(kRankTile, r - j0));
    Vec<T> acc[NR][kRankTile] = {};
    for (int64_t k = 0; k < Kp; k += L) {
      Vec<T> mv[NR];
      for (int i = 0; i < NR; ++i) mv[i] = load(m + i * Kp + k);
      for (int jj = 0; jj < nj; ++jj) {
        const int64_t j = j0 + jj;
        const Vec<T> av = load(a.Ap + j * Kp + k);
        Vec<T> da = load(dA + j * Kp + k);
        for (int i = 0; i < NR; ++i) {
          acc[i][jj] += mv[i] * av;
          da += sb[i][j] * mv[i];
        }
        store(dA + j * Kp + k, da);
      }
    }
    for (int i = 0; i < NR; ++i) {
      for (int jj = 0; jj < nj; ++jj) g.dB[(o + i) * r + j0 + jj] = a.s * cpu::lane_sum<T>(acc[i][jj]);
    }
  }
}

template <typename T>
PK_SIMD_INLINE void grad_chunks_body(const GradArgs<T>& g, int64_t c0, int64_t c1) {
  std::vector<T> m(static_cast<size_t>(kRowTile * g.op.Kp));
  std::vector<T> sb_store(static_cast<size_t>(kRowTile * g.op.r));
  for (int64_t c = c0; c < c1; ++c) {
    T* dA = g.partial + c * g.op.r * g.op.Kp;
    const int64_t end = std::min(g.rows, (c + 1) * g.chunk_rows);
    int64_t o = c * g.chunk_rows;
    for (; o + kRowTile <= end; o += kRowTile) {
      grad_tile<T, kRowTile>(g, dA, o, m.data(), sb_store.data());
    }
    for (; o < end; ++o) grad_tile<T, 1>(g, dA, o, m.data(), sb_store.data());
  }
}

template <typename T>
void generate_rows_generic(const RowOperands<T>& a, T* out, int64_t b, int64_t e) {
  generate_rows_body(a, out, b, e);
}
template <typename T>
void grad_chunks_generic(const GradArgs<T>& g, int64_t c0, int64_t c1) {
  grad_chunks_body(g, c0, c1);
}
#ifdef PK_X86_AVX2
template <typename T>
__attribute__((target("avx2,fma"))) void generate_rows_avx2(const RowOperands<T>& a, T* out,
                                                            int64_t b, int64_t e) {
  generate_rows_body(a, out, b, e);
}
template <typename T>
__attribute__((target("avx2,fma"))) void grad_chunks_avx2(const GradArgs<T>& g, int64_t c0,
                                                          int64_t c1) {
  grad_chunks_body(g, c0, c1);
}
#endif

// A zero-padded to [r, Kp] and the operands around it.
template <typename T, typename Params>
RowOperands<T> row_operands(const Params& p, std::vector<T>& Ap) {
  constexpr int L = ExpTraits<T>::kLanes;
  constexpr int64_t kWidth = kColVectors * L;
  const int64_t Kp = (p.K + kWidth - 1) / kWidth * kWidth;
  const T* A = static_cast<const T*>(p.A);
  Ap.assign(static_cast<size_t>(p.r * Kp), T(0));
  for (int64_t j = 0; j < p.r; ++j) std::memcpy(Ap.data() + j * Kp, A + j * p.K, sizeof(T) * p.K);
  return {static_cast<const T*>(p.weight), Ap.data(), static_cast<const T*>(p.B), p.K, Kp, p.r,
          static_cast<T>(p.scaling), p.first_order};
}

template <typename T>
void generate_impl(const LieWeightParams& p) {
  std::vector<T> Ap;
  const RowOperands<T> a = row_operands<T>(p, Ap);
  T* out = static_cast<T*>(p.out);
  auto rows = &generate_rows_generic<T>;
#ifdef PK_X86_AVX2
  if (cpu::have_avx2_fma()) rows = &generate_rows_avx2<T>;
#endif
  at::parallel_for(0, p.rows, 4 * kRowTile, [&](int64_t b, int64_t e) { rows(a, out, b, e); });
}

template <typename T>
void grad_impl(const LieWeightGradParams& p) {
  std::vector<T> Ap;
  const RowOperands<T> a = row_operands<T>(p, Ap);
  const int64_t r = p.r, rows = p.rows, Kp = a.Kp;
  // Whole row tiles per chunk, so a chunk boundary never splits a tile.
  const int64_t chunks = std::min(kGradChunks, (rows + kRowTile - 1) / kRowTile);
  const int64_t chunk_rows = ((rows + chunks - 1) / chunks + kRowTile - 1) / kRowTile * kRowTile;
  std::vector<T> partial(static_cast<size_t>(chunks * r * Kp), T(0));
  const GradArgs<T> g{a, static_cast<const T*>(p.grad), static_cast<T*>(p.dB), partial.data(),
                      rows, chunk_rows};
  auto run = &grad_chunks_generic<T>;
#ifdef PK_X86_AVX2
  if (cpu::have_avx2_fma()) run = &grad_chunks_avx2<T>;
#endif
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) { run(g, c0, c1); });
  T* dA = static_cast<T*>(p.dA);
  for (int64_t c = 0; c < chunks; ++c) {  // in chunk order
    const T* part = partial.data() + c * r * Kp;
    for (int64_t j = 0; j < r; ++j) {
      for (int64_t k = 0; k < p.K; ++k) dA[j * p.K + k] += part[j * Kp + k];
    }
  }
}

template <template <typename> class Fn, typename Params>
void dispatch_cpu(const Params& p) {
  switch (p.dtype) {
    case DType::kFloat32: return Fn<float>::run(p);
    case DType::kFloat64: return Fn<double>::run(p);
    default: TORCH_CHECK(false, "lie_weight: the CPU kernels support float32 and float64");
  }
}

template <typename T>
struct Generate {
  static void run(const LieWeightParams& p) { generate_impl<T>(p); }
};
template <typename T>
struct Grad {
  static void run(const LieWeightGradParams& p) { grad_impl<T>(p); }
};

}  // namespace

void lie_weight_cpu(const LieWeightParams& p) {
  if (p.rows > 0 && p.K > 0) dispatch_cpu<Generate>(p);
}

void lie_weight_grad_cpu(const LieWeightGradParams& p) {
  if (p.rows > 0 && p.K > 0) dispatch_cpu<Grad>(p);
}

}  // namespace peft_kernels
