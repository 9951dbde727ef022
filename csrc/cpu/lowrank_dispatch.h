// Run-time choice among the builds of the rank-r micro-kernels (cpu/lowrank.h: generic,
// cpu/lowrank_avx2.h, cpu/lowrank_avx512.h), for the ops that stream a long operand through them
// (lora_linear's passes, lie_weight's gradient).
#pragma once
#include <algorithm>
#include <cstdint>
#include <vector>

#include "cpu/cpu_features.h"
#include "cpu/lowrank.h"
#include "cpu/lowrank_avx2.h"
#include "cpu/lowrank_avx512.h"

namespace peft_kernels::cpu {

// Ranks are padded to whole vectors of the instruction set in use (see cpu/lowrank.h's RP).
template <typename T>
int64_t rank_lanes() {
  return (have_avx512() ? 64 : 32) / static_cast<int64_t>(sizeof(T));
}

inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// Leading dimension for a [rows, width] operand that reduce walks (or its [r, width] partial
// sums): rows a multiple of 4 KiB apart fall into the same L1 sets. 256 bytes of padding on the
// partial sums took the AVX2 reduce from 45 to 66 GFLOP/s at width 1024, r = 16.
template <typename T>
int64_t unaliased_ld(int64_t width) {
  const int64_t bytes = width * static_cast<int64_t>(sizeof(T));
  return bytes % 4096 == 0 ? width + 256 / static_cast<int64_t>(sizeof(T)) : width;
}

// [rows, cols] -> [rows, ld] with zero padding columns (or [cols, rows] transposed when asked).
template <typename T>
std::vector<T> padded(const T* src, int64_t rows, int64_t cols, int64_t ld, bool transpose) {
  std::vector<T> out((transpose ? cols : rows) * ld, T(0));
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) {
      if (transpose) out[j * ld + i] = src[i * cols + j];
      else out[i * ld + j] = src[i * cols + j];
    }
  return out;
}

template <typename T>
void project(const T* P, int64_t ldp, int64_t rows, int64_t K, const T* Q, int64_t RP, T* C,
             const T* S, T* R, T* colsum) {
#ifdef PK_X86_AVX2
  if (have_avx512()) return avx512::project_block<T>(P, ldp, rows, K, Q, RP, C, S, R, colsum);
  if (have_avx2_fma()) return avx2::project_block<T>(P, ldp, rows, K, Q, RP, C, S, R, colsum);
#endif
  project_block<T>(P, ldp, rows, K, Q, RP, C, S, R, colsum);
}

template <typename T>
void expand(const T* S, int64_t lds, int64_t r, const T* Q2, int64_t K, const T* init,
            const T* keep, T* D, const T* X, T* R2, int64_t n0, int64_t n1) {
#ifdef PK_X86_AVX2
  if (have_avx512()) return avx512::expand_rows<T>(S, lds, r, Q2, K, init, keep, D, X, R2, n0, n1);
  if (have_avx2_fma()) return avx2::expand_rows<T>(S, lds, r, Q2, K, init, keep, D, X, R2, n0, n1);
#endif
  expand_rows<T, 4>(S, lds, r, Q2, K, init, keep, D, X, R2, n0, n1);
}

template <typename T>
void reduce(const T* S, int64_t lds, int64_t r, const T* X, int64_t ldx, int64_t K, int64_t rows,
            T* R2, int64_t ldr) {
#ifdef PK_X86_AVX2
  if (have_avx512()) return avx512::reduce_rows<T>(S, lds, r, X, ldx, K, rows, R2, ldr);
  if (have_avx2_fma()) return avx2::reduce_rows<T>(S, lds, r, X, ldx, K, rows, R2, ldr);
#endif
  reduce_rows<T>(S, lds, r, X, ldx, K, rows, R2, ldr);
}

}  // namespace peft_kernels::cpu
