// AVX2 + FMA versions of the micro-kernels in cpu/lowrank.h (cpu/lowrank_simd.inc over 256-bit
// vectors), chosen at run time.
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

#define PK_LR_INLINE PK_AVX2
#define PK_LR_TARGET __attribute__((target("avx2,fma")))
#include "cpu/lowrank_simd.inc"
#undef PK_LR_INLINE
#undef PK_LR_TARGET

}  // namespace peft_kernels::cpu::avx2
#endif
