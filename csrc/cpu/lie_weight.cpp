// CPU kernels of the Lie-group Hadamard adapter (see csrc/kernels/lie_weight.h). Register-tiled
// over kRowTile output rows x one vector of columns: D = s B A for that tile is r vector FMAs per
// row with each A vector loaded once for all the tile's rows, then exp (or 1 + D) and the Hadamard
// product in registers, so the out x K update is never formed. The grad kernel writes
// M = G * W * factor for a block of rows to a buffer that stays in L2, then reduces it into dB
// (M A^T) and a per-chunk dA partial (B^T M) through the rank-r micro-kernels that lora_linear's
// passes use (cpu/lowrank_dispatch.h). The row loops are compiled for baseline x86-64, AVX2 + FMA
// and AVX-512 (chosen at run time), with a vectorised exp; vectors are GCC vector extensions
// (cpu/simd.h), so the code carries no intrinsics.
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
#include "cpu/lowrank_dispatch.h"
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

// exp over B-byte vectors (element-wise selects, no control flow).
template <typename T, int B>
struct ExpTraits;
template <int B>
struct ExpTraits<float, B> : cpu::VecTraits<float, B> {
  static constexpr int kDegree = 7;  // |t| <= ln2/2: truncation 5e-9 < 2^-24
  static constexpr float kLo = -104.0f, kHi = 89.0f;  // beyond: 0 and inf after scaling
  static constexpr float kRound = 12582912.0f;        // 1.5 * 2^23: x + kRound - kRound = rint(x)
  static constexpr int kMantissa = 23, kBias = 127;
};
template <int B>
struct ExpTraits<double, B> : cpu::VecTraits<double, B> {
  static constexpr int kDegree = 13;  // truncation 4e-18 < 2^-53
  static constexpr double kLo = -746.0, kHi = 710.0;
  static constexpr double kRound = 6755399441055744.0;  // 1.5 * 2^52
  static constexpr int kMantissa = 52, kBias = 1023;
};

// x = exp(x), lane-wise: 2^n * p(t), x = n ln2 + t (Cody-Waite, ln2 split in two), p the Taylor
// polynomial of degree kDegree; 2^n applied as two factors built from exponent bits, so that n
// up to the overflow threshold stays in range. NaN stays NaN; beyond the clamps the scaling
// overflows to inf or underflows to 0.
template <typename T, int B>
PK_SIMD_INLINE void exp_vec(cpu::Vec<T, B>& x) {
  using E = ExpTraits<T, B>;
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
template <typename T, int NR, int B>
PK_SIMD_INLINE void factor_vectors(const RowOperands<T>& a, const T* const* sb, int64_t k,
                                  Vec<T, B> (*f)[kColVectors]) {
  constexpr int L = cpu::kLanes<T, B>;
  for (int i = 0; i < NR; ++i) {
    for (int c = 0; c < kColVectors; ++c) f[i][c] = Vec<T, B>{};
  }
  for (int64_t j = 0; j < a.r; ++j) {
    Vec<T, B> av[kColVectors];
    for (int c = 0; c < kColVectors; ++c) av[c] = load<T, B>(a.Ap + j * a.Kp + k + c * L);
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
        exp_vec<T, B>(f[i][c]);
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
template <typename T, int NR, int B>
PK_SIMD_INLINE void generate_tile(const RowOperands<T>& a, T* out, int64_t o, T* sb_store) {
  constexpr int L = cpu::kLanes<T, B>;
  const T* sb[NR];
  scaled_b<T, NR>(a, o, sb_store, sb);
  for (int64_t k = 0; k < a.K; k += kColVectors * L) {
    Vec<T, B> f[NR][kColVectors];
    factor_vectors<T, NR, B>(a, sb, k, f);
    for (int c = 0; c < kColVectors; ++c) {
      const int64_t kc = k + c * L, n = std::min<int64_t>(L, a.K - kc);
      for (int i = 0; i < NR; ++i) {
        const T* w = a.W + (o + i) * a.K + kc;
        T* y = out + (o + i) * a.K + kc;
        if (n == L) {
          store<T, B>(y, f[i][c] * load<T, B>(w));
        } else if (n > 0) {
          store_part<T, B>(y, f[i][c] * load_part<T, B>(w, n), n);
        }
      }
    }
  }
}

template <typename T, int B>
PK_SIMD_INLINE void generate_rows_body(const RowOperands<T>& a, T* out, int64_t begin,
                                      int64_t end) {
  std::vector<T> sb_store(static_cast<size_t>(kRowTile * a.r));
  int64_t o = begin;
  for (; o + kRowTile <= end; o += kRowTile) {
    generate_tile<T, kRowTile, B>(a, out, o, sb_store.data());
  }
  for (; o < end; ++o) generate_tile<T, 1, B>(a, out, o, sb_store.data());
}

template <typename T>
struct GradArgs {
  RowOperands<T> op;
  const T* G;
};

// M rows [o, o + NR) = G * W * factor into m (leading dimension ldm), zero from K to Kp.
template <typename T, int NR, int B>
PK_SIMD_INLINE void m_tile(const GradArgs<T>& g, int64_t o, T* m, int64_t ldm, T* sb_store) {
  constexpr int L = cpu::kLanes<T, B>;
  const RowOperands<T>& a = g.op;
  const int64_t K = a.K, Kp = a.Kp;
  const T* sb[NR];
  scaled_b<T, NR>(a, o, sb_store, sb);
  for (int64_t k = 0; k < Kp; k += kColVectors * L) {
    Vec<T, B> f[NR][kColVectors];
    if (!a.first_order) factor_vectors<T, NR, B>(a, sb, k, f);
    for (int c = 0; c < kColVectors; ++c) {
      const int64_t kc = k + c * L, n = std::max<int64_t>(0, std::min<int64_t>(L, K - kc));
      for (int i = 0; i < NR; ++i) {
        const int64_t at = (o + i) * K + kc;
        Vec<T, B> gw = {};  // zero past K: adds nothing to the reductions
        if (n == L) {
          gw = load<T, B>(g.G + at) * load<T, B>(a.W + at);
        } else if (n > 0) {
          gw = load_part<T, B>(g.G + at, n) * load_part<T, B>(a.W + at, n);
        }
        store<T, B>(m + i * ldm + kc, a.first_order ? gw : gw * f[i][c]);
      }
    }
  }
}

// M for rows [o0, o1) into m (row o0 first).
template <typename T, int B>
PK_SIMD_INLINE void m_rows_body(const GradArgs<T>& g, int64_t o0, int64_t o1, T* m, int64_t ldm) {
  std::vector<T> sb(static_cast<size_t>(kRowTile * g.op.r));
  int64_t o = o0;
  for (; o + kRowTile <= o1; o += kRowTile) {
    m_tile<T, kRowTile, B>(g, o, m + (o - o0) * ldm, ldm, sb.data());
  }
  for (; o < o1; ++o) m_tile<T, 1, B>(g, o, m + (o - o0) * ldm, ldm, sb.data());
}

template <typename T>
void generate_rows_generic(const RowOperands<T>& a, T* out, int64_t b, int64_t e) {
  generate_rows_body<T, 32>(a, out, b, e);
}
template <typename T>
void m_rows_generic(const GradArgs<T>& g, int64_t o0, int64_t o1, T* m, int64_t ldm) {
  m_rows_body<T, 32>(g, o0, o1, m, ldm);
}
#ifdef PK_X86_AVX2
template <typename T>
__attribute__((target("avx2,fma"))) void generate_rows_avx2(const RowOperands<T>& a, T* out,
                                                            int64_t b, int64_t e) {
  generate_rows_body<T, 32>(a, out, b, e);
}
template <typename T>
__attribute__((target("avx2,fma"))) void m_rows_avx2(const GradArgs<T>& g, int64_t o0, int64_t o1,
                                                     T* m, int64_t ldm) {
  m_rows_body<T, 32>(g, o0, o1, m, ldm);
}
template <typename T>
__attribute__((target("avx512f,avx2,fma"))) void generate_rows_avx512(const RowOperands<T>& a,
                                                                      T* out, int64_t b,
                                                                      int64_t e) {
  generate_rows_body<T, 64>(a, out, b, e);
}
template <typename T>
__attribute__((target("avx512f,avx2,fma"))) void m_rows_avx512(const GradArgs<T>& g, int64_t o0,
                                                               int64_t o1, T* m, int64_t ldm) {
  m_rows_body<T, 64>(g, o0, o1, m, ldm);
}
#endif

// A zero-padded to [r, Kp] and the operands around it.
template <typename T, typename Params>
RowOperands<T> row_operands(const Params& p, std::vector<T>& Ap) {
  // Whole kColVectors-vector tiles of the widest vectors in use (64 bytes), so every build's
  // loops over Kp see whole tiles.
  constexpr int64_t kWidth = kColVectors * cpu::kLanes<T, 64>;
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
  if (cpu::have_avx512()) {
    rows = &generate_rows_avx512<T>;
  } else if (cpu::have_avx2_fma()) {
    rows = &generate_rows_avx2<T>;
  }
#endif
  at::parallel_for(0, p.rows, 4 * kRowTile, [&](int64_t b, int64_t e) { rows(a, out, b, e); });
}

template <typename T>
void grad_impl(const LieWeightGradParams& p) {
  std::vector<T> Ap;
  const RowOperands<T> a = row_operands<T>(p, Ap);
  const int64_t r = p.r, rows = p.rows, Kp = a.Kp;
  const GradArgs<T> g{a, static_cast<const T*>(p.grad)};
  // A^T [Kp, RP] for dB = M A^T (rows past K and ranks past r zero).
  const int64_t RP = cpu::round_up(r, cpu::rank_lanes<T>());
  std::vector<T> At = cpu::padded(static_cast<const T*>(p.A), r, p.K, RP, true);
  At.resize(static_cast<size_t>(Kp * RP), T(0));
  // Fixed row chunks, each with its own dA partial, added in order at the end: the result does not
  // depend on the number of threads. Within a chunk, blocks of rows whose M (~256 KiB) stays in L2
  // while both products read it.
  const int64_t chunks = std::min(kGradChunks, (rows + kRowTile - 1) / kRowTile);
  const int64_t chunk_rows = ((rows + chunks - 1) / chunks + kRowTile - 1) / kRowTile * kRowTile;
  const int64_t ldm = cpu::unaliased_ld<T>(Kp);
  const int64_t block_rows = std::clamp<int64_t>(
      (256 * 1024) / (ldm * static_cast<int64_t>(sizeof(T))) / kRowTile * kRowTile, kRowTile,
      chunk_rows);
  std::vector<T> partial(static_cast<size_t>(chunks * r * ldm), T(0));
  auto m_rows = &m_rows_generic<T>;
#ifdef PK_X86_AVX2
  if (cpu::have_avx512()) {
    m_rows = &m_rows_avx512<T>;
  } else if (cpu::have_avx2_fma()) {
    m_rows = &m_rows_avx2<T>;
  }
#endif
  const T* B = static_cast<const T*>(p.B);
  T* dB = static_cast<T*>(p.dB);
  const T s = static_cast<T>(p.scaling);
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    std::vector<T> m(static_cast<size_t>(block_rows * ldm)), C(static_cast<size_t>(block_rows * RP));
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t end = std::min(rows, (c + 1) * chunk_rows);
      for (int64_t o = c * chunk_rows; o < end; o += block_rows) {
        const int64_t n = std::min(block_rows, end - o);
        m_rows(g, o, o + n, m.data(), ldm);
        cpu::project<T>(m.data(), ldm, n, Kp, At.data(), RP, C.data(), nullptr, nullptr, nullptr);
        for (int64_t i = 0; i < n; ++i)
          for (int64_t j = 0; j < r; ++j) dB[(o + i) * r + j] = s * C[i * RP + j];
        // dA partial [r, Kp] += B[rows]^T M; s goes on at the end.
        cpu::reduce<T>(B + o * r, r, r, m.data(), ldm, Kp, n, partial.data() + c * r * ldm, ldm);
      }
    }
  });
  T* dA = static_cast<T*>(p.dA);
  at::parallel_for(0, r, 1, [&](int64_t j0, int64_t j1) {
    std::vector<T> sum(static_cast<size_t>(p.K));
    for (int64_t j = j0; j < j1; ++j) {
      std::fill(sum.begin(), sum.end(), T(0));
      for (int64_t c = 0; c < chunks; ++c) {  // in chunk order
        const T* part = partial.data() + (c * r + j) * ldm;
        for (int64_t k = 0; k < p.K; ++k) sum[k] += part[k];
      }
      for (int64_t k = 0; k < p.K; ++k) dA[j * p.K + k] += s * sum[k];
    }
  });
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
