// AVX-512 versions of the micro-kernels in cpu/lowrank.h (cpu/lowrank_simd.inc over 512-bit
// vectors), chosen at run time. The caller pads the rank to a whole 512-bit vector (16 floats,
// 8 doubles).
#pragma once
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#define PK_AVX512 __attribute__((target("avx512f,avx2,fma"), always_inline)) inline

namespace peft_kernels::cpu::avx512 {

template <typename T>
struct Vec;
template <>
struct Vec<float> {
  using R = __m512;
  static constexpr int W = 16;
  PK_AVX512 static R load(const float* p) { return _mm512_loadu_ps(p); }
  PK_AVX512 static void store(float* p, R v) { _mm512_storeu_ps(p, v); }
  PK_AVX512 static R set1(float v) { return _mm512_set1_ps(v); }
  PK_AVX512 static R zero() { return _mm512_setzero_ps(); }
  PK_AVX512 static R fma(R a, R b, R c) { return _mm512_fmadd_ps(a, b, c); }
  PK_AVX512 static R mul(R a, R b) { return _mm512_mul_ps(a, b); }
};
template <>
struct Vec<double> {
  using R = __m512d;
  static constexpr int W = 8;
  PK_AVX512 static R load(const double* p) { return _mm512_loadu_pd(p); }
  PK_AVX512 static void store(double* p, R v) { _mm512_storeu_pd(p, v); }
  PK_AVX512 static R set1(double v) { return _mm512_set1_pd(v); }
  PK_AVX512 static R zero() { return _mm512_setzero_pd(); }
  PK_AVX512 static R fma(R a, R b, R c) { return _mm512_fmadd_pd(a, b, c); }
  PK_AVX512 static R mul(R a, R b) { return _mm512_mul_pd(a, b); }
};

#define PK_LR_INLINE PK_AVX512
#define PK_LR_TARGET __attribute__((target("avx512f,avx2,fma")))
#include "cpu/lowrank_simd.inc"
#undef PK_LR_INLINE
#undef PK_LR_TARGET

}  // namespace peft_kernels::cpu::avx512
#endif
