// AVX2 + FMA versions of the micro-kernels in cpu/lowrank.h (same contracts), chosen at run time.
// Register blocking is explicit: each variant keeps its accumulators within the 16 ymm registers.
#pragma once
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#define PK_AVX2 __attribute__((target("avx2,fma"), always_inline)) inline

namespace peft_kernels::cpu::avx2 {

template <typename T>
struct Vec;
template <>
struct Vec<float> {
  using R = __m256;
  static constexpr int W = 8;
  PK_AVX2 static R load(const float* p) { return _mm256_loadu_ps(p); }
  PK_AVX2 static void store(float* p, R v) { _mm256_storeu_ps(p, v); }
  PK_AVX2 static R set1(float v) { return _mm256_set1_ps(v); }
  PK_AVX2 static R zero() { return _mm256_setzero_ps(); }
  PK_AVX2 static R fma(R a, R b, R c) { return _mm256_fmadd_ps(a, b, c); }
  PK_AVX2 static R mul(R a, R b) { return _mm256_mul_ps(a, b); }
};
template <>
struct Vec<double> {
  using R = __m256d;
  static constexpr int W = 4;
  PK_AVX2 static R load(const double* p) { return _mm256_loadu_pd(p); }
  PK_AVX2 static void store(double* p, R v) { _mm256_storeu_pd(p, v); }
  PK_AVX2 static R set1(double v) { return _mm256_set1_pd(v); }
  PK_AVX2 static R zero() { return _mm256_setzero_pd(); }
  PK_AVX2 static R fma(R a, R b, R c) { return _mm256_fmadd_pd(a, b, c); }
  PK_AVX2 static R mul(R a, R b) { return _mm256_mul_pd(a, b); }
};

// project, columns [t0, t0 + NV*W) for MR rows at a time (see cpu/lowrank.h).
template <typename T, int NV, int MR, bool kR, bool kColsum>
PK_AVX2 void project_rows(const T* __restrict P, int64_t ldp, int64_t n, int64_t K,
                          const T* __restrict Q, int64_t RP, int64_t t0, T* __restrict C,
                          const T* __restrict S, T* __restrict R, T* __restrict colsum) {
  using V = Vec<T>;
  typename V::R acc[MR][NV], s[MR][NV];
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < NV; ++v) {
      acc[m][v] = V::zero();
      if constexpr (kR) s[m][v] = V::load(S + (n + m) * RP + t0 + v * V::W);
    }
  const T* prow[MR];
  for (int m = 0; m < MR; ++m) prow[m] = P + (n + m) * ldp;
  for (int64_t j = 0; j < K; ++j) {
    typename V::R q[NV];
    for (int v = 0; v < NV; ++v) q[v] = V::load(Q + j * RP + t0 + v * V::W);
    if constexpr (kR) {
      typename V::R pm[MR], rr[NV];
      for (int m = 0; m < MR; ++m) pm[m] = V::set1(prow[m][j]);
      for (int v = 0; v < NV; ++v) rr[v] = V::load(R + j * RP + t0 + v * V::W);
      for (int m = 0; m < MR; ++m)
        for (int v = 0; v < NV; ++v) {
          acc[m][v] = V::fma(pm[m], q[v], acc[m][v]);
          rr[v] = V::fma(pm[m], s[m][v], rr[v]);
        }
      for (int v = 0; v < NV; ++v) V::store(R + j * RP + t0 + v * V::W, rr[v]);
    } else {
      for (int m = 0; m < MR; ++m) {
        const typename V::R pm = V::set1(prow[m][j]);
        for (int v = 0; v < NV; ++v) acc[m][v] = V::fma(pm, q[v], acc[m][v]);
      }
    }
    if constexpr (kColsum) {
      T sum = 0;
      for (int m = 0; m < MR; ++m) sum += prow[m][j];
      colsum[j] += sum;
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < NV; ++v) V::store(C + (n + m) * RP + t0 + v * V::W, acc[m][v]);
}

template <typename T, int NV, int MR, bool kR, bool kColsum>
PK_AVX2 void project_tile(const T* P, int64_t ldp, int64_t rows, int64_t K, const T* Q, int64_t RP,
                          int64_t t0, T* C, const T* S, T* R, T* colsum) {
  int64_t n = 0;
  for (; n + MR <= rows; n += MR)
    project_rows<T, NV, MR, kR, kColsum>(P, ldp, n, K, Q, RP, t0, C, S, R, colsum);
  for (; n < rows; ++n) project_rows<T, NV, 1, kR, kColsum>(P, ldp, n, K, Q, RP, t0, C, S, R, colsum);
}

template <typename T, bool kR>
PK_AVX2 void project_block_impl(const T* P, int64_t ldp, int64_t rows, int64_t K, const T* Q,
                                int64_t RP, T* C, const T* S, T* R, T* colsum) {
  constexpr int W = Vec<T>::W;
  int64_t t0 = 0;
  for (; t0 + 2 * W <= RP; t0 += 2 * W) {
    if (colsum && t0 == 0) project_tile<T, 2, kR ? 2 : 4, kR, true>(P, ldp, rows, K, Q, RP, t0, C, S, R, colsum);
    else project_tile<T, 2, kR ? 2 : 4, kR, false>(P, ldp, rows, K, Q, RP, t0, C, S, R, nullptr);
  }
  for (; t0 < RP; t0 += W) {
    if (colsum && t0 == 0) project_tile<T, 1, kR ? 4 : 8, kR, true>(P, ldp, rows, K, Q, RP, t0, C, S, R, colsum);
    else project_tile<T, 1, kR ? 4 : 8, kR, false>(P, ldp, rows, K, Q, RP, t0, C, S, R, nullptr);
  }
}

template <typename T>
__attribute__((target("avx2,fma"))) void project_block(const T* P, int64_t ldp, int64_t rows,
                                                       int64_t K, const T* Q, int64_t RP, T* C,
                                                       const T* S, T* R, T* colsum) {
  if (R) project_block_impl<T, true>(P, ldp, rows, K, Q, RP, C, S, R, colsum);
  else project_block_impl<T, false>(P, ldp, rows, K, Q, RP, C, S, R, colsum);
}

// expand for MR rows and JV vectors of columns at j (see cpu/lowrank.h).
template <typename T, int MR, int JV, bool kD, bool kR2>
PK_AVX2 void expand_cell(const T* __restrict S, int64_t lds, int64_t r, const T* __restrict Q2,
                         int64_t K, const T* __restrict init, const T* __restrict keep,
                         T* __restrict D, const T* __restrict X, T* __restrict R2, int64_t n,
                         int64_t j) {
  using V = Vec<T>;
  typename V::R d[MR][JV], x[MR][JV];
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < JV; ++v) {
      if constexpr (kD) d[m][v] = init ? V::load(init + j + v * V::W) : V::zero();
      if constexpr (kR2) x[m][v] = V::load(X + (n + m) * K + j + v * V::W);
    }
  const T* srow[MR];
  for (int m = 0; m < MR; ++m) srow[m] = S + (n + m) * lds;
  for (int64_t k = 0; k < r; ++k) {
    typename V::R q[JV], rr[JV];
    if constexpr (kD)
      for (int v = 0; v < JV; ++v) q[v] = V::load(Q2 + k * K + j + v * V::W);
    if constexpr (kR2)
      for (int v = 0; v < JV; ++v) rr[v] = V::load(R2 + k * K + j + v * V::W);
    for (int m = 0; m < MR; ++m) {
      const typename V::R c = V::set1(srow[m][k]);
      for (int v = 0; v < JV; ++v) {
        if constexpr (kD) d[m][v] = V::fma(c, q[v], d[m][v]);
        if constexpr (kR2) rr[v] = V::fma(c, x[m][v], rr[v]);
      }
    }
    if constexpr (kR2)
      for (int v = 0; v < JV; ++v) V::store(R2 + k * K + j + v * V::W, rr[v]);
  }
  if constexpr (kD)
    for (int m = 0; m < MR; ++m)
      for (int v = 0; v < JV; ++v) {
        T* out = D + (n + m) * K + j + v * V::W;
        V::store(out, keep ? V::mul(d[m][v], V::load(keep + (n + m) * K + j + v * V::W)) : d[m][v]);
      }
}

// One group of M rows across all K columns: JV-vector cells, then single vectors, then scalars.
template <typename T, int M, int JV, bool kD, bool kR2>
PK_AVX2 void expand_row_group(const T* S, int64_t lds, int64_t r, const T* Q2, int64_t K,
                              const T* init, const T* keep, T* D, const T* X, T* R2, int64_t n) {
  constexpr int W = Vec<T>::W;
  const int64_t jv_end = K / (JV * W) * (JV * W), j1_end = K / W * W;
  for (int64_t j = 0; j < jv_end; j += JV * W)
    expand_cell<T, M, JV, kD, kR2>(S, lds, r, Q2, K, init, keep, D, X, R2, n, j);
  for (int64_t j = jv_end; j < j1_end; j += W)
    expand_cell<T, M, 1, kD, kR2>(S, lds, r, Q2, K, init, keep, D, X, R2, n, j);
  for (int64_t j = j1_end; j < K; ++j) {  // tail columns, scalar
    for (int m = 0; m < M; ++m) {
      T acc = init ? init[j] : T(0);
      const T xv = kR2 ? X[(n + m) * K + j] : T(0);
      for (int64_t k = 0; k < r; ++k) {
        const T c = S[(n + m) * lds + k];
        if constexpr (kD) acc += c * Q2[k * K + j];
        if constexpr (kR2) R2[k * K + j] += c * xv;
      }
      if constexpr (kD) D[(n + m) * K + j] = keep ? acc * keep[(n + m) * K + j] : acc;
    }
  }
}

template <typename T, bool kD, bool kR2>
PK_AVX2 void expand_impl(const T* S, int64_t lds, int64_t r, const T* Q2, int64_t K,
                         const T* init, const T* keep, T* D, const T* X, T* R2, int64_t n0,
                         int64_t n1) {
  constexpr int JV = (kD && kR2) ? 1 : 2;  // register budget: d and x tiles both live when 1
  constexpr int MR = 4;
  int64_t n = n0;
  for (; n + MR <= n1; n += MR)
    expand_row_group<T, MR, JV, kD, kR2>(S, lds, r, Q2, K, init, keep, D, X, R2, n);
  for (; n < n1; ++n)
    expand_row_group<T, 1, JV, kD, kR2>(S, lds, r, Q2, K, init, keep, D, X, R2, n);
}

template <typename T>
__attribute__((target("avx2,fma"))) void expand_rows(const T* S, int64_t lds, int64_t r,
                                                     const T* Q2, int64_t K, const T* init,
                                                     const T* keep, T* D, const T* X, T* R2,
                                                     int64_t n0, int64_t n1) {
  if (D && R2) expand_impl<T, true, true>(S, lds, r, Q2, K, init, keep, D, X, R2, n0, n1);
  else if (D) expand_impl<T, true, false>(S, lds, r, Q2, K, init, keep, D, X, R2, n0, n1);
  else if (R2) expand_impl<T, false, true>(S, lds, r, Q2, K, init, keep, D, X, R2, n0, n1);
}

// reduce: R2[k, j] += sum_n S[n, k] X[n, j] over rows [0, rows): a KR x (JV vectors) tile of R2
// (leading dimension ldr) stays in registers for the whole row loop (rows of X come from cache).
template <typename T, int KR, int JV>
PK_AVX2 void reduce_cell(const T* __restrict S, int64_t lds, const T* __restrict X, int64_t ldx,
                         int64_t ldr, int64_t rows, int64_t k0, int64_t j, T* __restrict R2) {
  using V = Vec<T>;
  typename V::R acc[KR][JV];
  for (int kk = 0; kk < KR; ++kk)
    for (int v = 0; v < JV; ++v) acc[kk][v] = V::load(R2 + (k0 + kk) * ldr + j + v * V::W);
  for (int64_t n = 0; n < rows; ++n) {
    typename V::R xv[JV];
    for (int v = 0; v < JV; ++v) xv[v] = V::load(X + n * ldx + j + v * V::W);
    const T* srow = S + n * lds + k0;
    for (int kk = 0; kk < KR; ++kk) {
      const typename V::R c = V::set1(srow[kk]);
      for (int v = 0; v < JV; ++v) acc[kk][v] = V::fma(c, xv[v], acc[kk][v]);
    }
  }
  for (int kk = 0; kk < KR; ++kk)
    for (int v = 0; v < JV; ++v) V::store(R2 + (k0 + kk) * ldr + j + v * V::W, acc[kk][v]);
}

// All ranks for one strip of JV vectors of columns: the strip of X stays in L1 across rank tiles.
template <typename T, int JV>
PK_AVX2 void reduce_strip(const T* S, int64_t lds, int64_t r, const T* X, int64_t ldx, int64_t ldr,
                          int64_t rows, int64_t j, T* R2) {
  int64_t k0 = 0;
  for (; k0 + 4 <= r; k0 += 4) reduce_cell<T, 4, JV>(S, lds, X, ldx, ldr, rows, k0, j, R2);
  switch (r - k0) {
    case 3: reduce_cell<T, 3, JV>(S, lds, X, ldx, ldr, rows, k0, j, R2); break;
    case 2: reduce_cell<T, 2, JV>(S, lds, X, ldx, ldr, rows, k0, j, R2); break;
    case 1: reduce_cell<T, 1, JV>(S, lds, X, ldx, ldr, rows, k0, j, R2); break;
    default: break;
  }
}

template <typename T>
__attribute__((target("avx2,fma"))) void reduce_rows(const T* S, int64_t lds, int64_t r,
                                                     const T* X, int64_t ldx, int64_t K,
                                                     int64_t rows, T* R2, int64_t ldr) {
  constexpr int W = Vec<T>::W, JV = 3;
  // Rows of X 4 KiB apart share L1 sets: a strip over many rows thrashes the 8 ways. Then sweep
  // 8 rows at a time, reloading R2 per sweep, which pays while R2 stays in L1/L2 (<= 64 KiB).
  // (R2's own rows should not be 4 KiB apart too: see the callers' ldr.)
  const bool aliased = (ldx * static_cast<int64_t>(sizeof(T))) % 4096 == 0;
  const int64_t sweep = aliased && r * K * static_cast<int64_t>(sizeof(T)) <= 64 * 1024
                            ? 8 : std::max<int64_t>(rows, 1);
  const int64_t jv_end = K / (JV * W) * (JV * W), j1_end = K / W * W;
  for (int64_t n0 = 0; n0 < rows; n0 += sweep) {
    const int64_t nr = std::min<int64_t>(sweep, rows - n0);
    const T* Sb = S + n0 * lds;
    const T* Xb = X + n0 * ldx;
    for (int64_t j = 0; j < jv_end; j += JV * W) reduce_strip<T, JV>(Sb, lds, r, Xb, ldx, ldr, nr, j, R2);
    for (int64_t j = jv_end; j < j1_end; j += W) reduce_strip<T, 1>(Sb, lds, r, Xb, ldx, ldr, nr, j, R2);
    for (int64_t j = j1_end; j < K; ++j)
      for (int64_t k = 0; k < r; ++k) {
        T acc = R2[k * ldr + j];
        for (int64_t n = 0; n < nr; ++n) acc += Sb[n * lds + k] * Xb[n * ldx + j];
        R2[k * ldr + j] = acc;
      }
  }
}

}  // namespace peft_kernels::cpu::avx2
#endif
