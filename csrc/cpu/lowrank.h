// Register-blocked CPU micro-kernels for the rank-r products of the adapter branch. BLAS is slow
// on these shapes (one side r <= 64 wide: 6-30 GFLOP/s measured with MKL at r = 8), while each
// product is a stream over a long [rows, width] operand with r-wide rows of the other held in
// registers. Two shapes cover all six products:
//
//   project: C[n, :] = sum_j P[n, j] Q[j, :]             (P [rows, K], Q [K, RP], C [rows, RP])
//            R[j, :] += sum_n P[n, j] S[n, :]   optional  (S [rows, RP], R [K, RP])
//            colsum[j] += sum_n P[n, j]          optional
//   expand:  D[n, j] = keep[n, j] (init[j] + sum_k S[n, k] Q2[k, j])   (Q2 [r, K], D [rows, K])
//            R2[k, j] += sum_n S[n, k] X[n, j]  optional  (X [rows, K], R2 [r, K])
//
// RP is r rounded up to a whole number of vectors; padding columns are zero. Loops have
// compile-time vector widths so the compiler emits SIMD code; callers pick an AVX2+FMA build of
// the same templates at run time.
#pragma once
#include <cstdint>

#if defined(__GNUC__)
#define PK_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define PK_ALWAYS_INLINE inline
#endif

namespace peft_kernels::cpu {

template <typename T>
constexpr int simd_width() {
  return static_cast<int>(32 / sizeof(T));  // one 256-bit vector
}

// Columns [t0, t0 + TW) of C (and R) for rows [0, rows) of P; MR rows share each Q/R load.
template <typename T, int TW, int MR>
PK_ALWAYS_INLINE void project_tile(const T* __restrict P, int64_t ldp, int64_t rows, int64_t K,
                                   const T* __restrict Q, int64_t RP, int64_t t0, T* __restrict C,
                                   const T* __restrict S, T* __restrict R, T* __restrict colsum) {
  int64_t n = 0;
  for (; n + MR <= rows; n += MR) {
    T acc[MR][TW] = {};
    T s[MR][TW];
    if (R) {
      for (int m = 0; m < MR; ++m)
        for (int k = 0; k < TW; ++k) s[m][k] = S[(n + m) * RP + t0 + k];
    }
    for (int64_t j = 0; j < K; ++j) {
      T p[MR];
      for (int m = 0; m < MR; ++m) p[m] = P[(n + m) * ldp + j];
      const T* q = Q + j * RP + t0;
      for (int m = 0; m < MR; ++m)
        for (int k = 0; k < TW; ++k) acc[m][k] += p[m] * q[k];
      if (R) {
        T* rr = R + j * RP + t0;
        T racc[TW];
        for (int k = 0; k < TW; ++k) racc[k] = rr[k];
        for (int m = 0; m < MR; ++m)
          for (int k = 0; k < TW; ++k) racc[k] += p[m] * s[m][k];
        for (int k = 0; k < TW; ++k) rr[k] = racc[k];
      }
      if (colsum) {
        T sum = 0;
        for (int m = 0; m < MR; ++m) sum += p[m];
        colsum[j] += sum;
      }
    }
    for (int m = 0; m < MR; ++m)
      for (int k = 0; k < TW; ++k) C[(n + m) * RP + t0 + k] = acc[m][k];
  }
  if constexpr (MR > 1) {
    if (n < rows) {
      project_tile<T, TW, 1>(P + n * ldp, ldp, rows - n, K, Q, RP, t0, C + n * RP,
                             S ? S + n * RP : nullptr, R, colsum);
    }
  }
}

template <typename T>
PK_ALWAYS_INLINE void project_block(const T* P, int64_t ldp, int64_t rows, int64_t K, const T* Q,
                                    int64_t RP, T* C, const T* S, T* R, T* colsum) {
  constexpr int V = simd_width<T>();
  int64_t t0 = 0;
  // Two vectors of ranks per pass with 2 rows, one vector with 4 rows: both fit 16 registers.
  for (; t0 + 2 * V <= RP; t0 += 2 * V) {
    project_tile<T, 2 * V, 2>(P, ldp, rows, K, Q, RP, t0, C, S, R, t0 == 0 ? colsum : nullptr);
  }
  for (; t0 < RP; t0 += V) {
    project_tile<T, V, 4>(P, ldp, rows, K, Q, RP, t0, C, S, R, t0 == 0 ? colsum : nullptr);
  }
}

// Rows [0, rows): D = keep * (init + S Q2), and R2 += S^T X. Vectorised along j (K).
template <typename T, int MR>
PK_ALWAYS_INLINE void expand_rows(const T* __restrict S, int64_t lds, int64_t r, const T* __restrict Q2,
                                  int64_t K, const T* __restrict init, const T* __restrict keep,
                                  T* __restrict D, const T* __restrict X, T* __restrict R2,
                                  int64_t n0, int64_t n1) {
  constexpr int V = simd_width<T>();
  int64_t n = n0;
  for (; n + MR <= n1; n += MR) {
    int64_t j = 0;
    for (; j + V <= K; j += V) {
      T d[MR][V] = {};
      T x[MR][V];
      if (init) {
        for (int m = 0; m < MR; ++m)
          for (int v = 0; v < V; ++v) d[m][v] = init[j + v];
      }
      if (R2) {
        for (int m = 0; m < MR; ++m)
          for (int v = 0; v < V; ++v) x[m][v] = X[(n + m) * K + j + v];
      }
      for (int64_t k = 0; k < r; ++k) {
        T c[MR];
        for (int m = 0; m < MR; ++m) c[m] = S[(n + m) * lds + k];
        if (D) {
          const T* q = Q2 + k * K + j;
          for (int m = 0; m < MR; ++m)
            for (int v = 0; v < V; ++v) d[m][v] += c[m] * q[v];
        }
        if (R2) {
          T* rr = R2 + k * K + j;
          T racc[V];
          for (int v = 0; v < V; ++v) racc[v] = rr[v];
          for (int m = 0; m < MR; ++m)
            for (int v = 0; v < V; ++v) racc[v] += c[m] * x[m][v];
          for (int v = 0; v < V; ++v) rr[v] = racc[v];
        }
      }
      if (D) {
        for (int m = 0; m < MR; ++m) {
          T* out = D + (n + m) * K + j;
          if (keep) {
            const T* kp = keep + (n + m) * K + j;
            for (int v = 0; v < V; ++v) out[v] = d[m][v] * kp[v];
          } else {
            for (int v = 0; v < V; ++v) out[v] = d[m][v];
          }
        }
      }
    }
    for (; j < K; ++j) {  // tail columns
      for (int m = 0; m < MR; ++m) {
        T acc = init ? init[j] : T(0);
        const T xv = R2 ? X[(n + m) * K + j] : T(0);
        for (int64_t k = 0; k < r; ++k) {
          const T c = S[(n + m) * lds + k];
          acc += c * Q2[k * K + j];
          if (R2) R2[k * K + j] += c * xv;
        }
        if (D) D[(n + m) * K + j] = keep ? acc * keep[(n + m) * K + j] : acc;
      }
    }
  }
  if constexpr (MR > 1) {
    if (n < n1) expand_rows<T, 1>(S, lds, r, Q2, K, init, keep, D, X, R2, n, n1);
  }
}

// R2[k, j] += sum_n S[n, k] X[n, j] for rows [0, rows)  (S [rows, lds], X [rows, ldx],
// R2 [r, K] with leading dimension ldr).
template <typename T>
inline void reduce_rows(const T* __restrict S, int64_t lds, int64_t r, const T* __restrict X,
                        int64_t ldx, int64_t K, int64_t rows, T* __restrict R2, int64_t ldr) {
  for (int64_t n = 0; n < rows; ++n)
    for (int64_t k = 0; k < r; ++k) {
      const T c = S[n * lds + k];
      T* rr = R2 + k * ldr;
      const T* x = X + n * ldx;
      for (int64_t j = 0; j < K; ++j) rr[j] += c * x[j];
    }
}

}  // namespace peft_kernels::cpu
