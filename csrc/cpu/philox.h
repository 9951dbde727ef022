// Philox bits for whole rows on the CPU. The scalar loop does not vectorise (the 32x32->64
// multiplies defeat gcc), so x86-64 gets AVX2 and AVX-512 versions chosen at run time: 8 / 16
// counters per instruction stream, same bits as the scalar HOST_DEVICE philox4x32_10 in
// kernels/common.h. AVX-512 measured 2.2x the AVX2 rate on one Zen 5 core (4096 rows of 1024:
// 1.61 against 3.56 ms).
#pragma once
#include <cstdint>

#include "cpu/cpu_features.h"
#include "kernels/common.h"

#ifdef PK_X86_AVX2
#include <immintrin.h>
#endif

namespace peft_kernels::cpu {

// out[4 c + lane] = dropout_bits(seed, row, c).v[lane] for c in [first, groups).
inline void philox_row_bits_scalar(int64_t seed, int64_t row, int64_t first, int64_t groups,
                                   uint32_t* out) {
  for (int64_t c = first; c < groups; ++c) {
    const Philox4 bits = dropout_bits(seed, row, c);
    for (int lane = 0; lane < 4; ++lane) out[4 * c + lane] = bits.v[lane];
  }
}

#ifdef PK_X86_AVX2
__attribute__((target("avx2"))) inline void philox_mulhilo8(__m256i a, __m256i m, __m256i& hi,
                                                            __m256i& lo) {
  const __m256i even = _mm256_mul_epu32(a, m);                         // 32-bit lanes 0,2,4,6
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);   // 32-bit lanes 1,3,5,7
  lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
}

// Groups [first, first + 8 j) for the largest such j with first + 8 j <= groups; returns the end
// of what it did. The caller finishes the rest.
__attribute__((target("avx2"))) inline int64_t philox_row_bits_avx2(int64_t seed, int64_t row,
                                                                     int64_t first, int64_t groups,
                                                                     uint32_t* out) {
  const uint64_t s = static_cast<uint64_t>(seed), r = static_cast<uint64_t>(row);
  const __m256i m0 = _mm256_set1_epi32(static_cast<int>(0xD2511F53u));
  const __m256i m1 = _mm256_set1_epi32(static_cast<int>(0xCD9E8D57u));
  const __m256i row_lo = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(r)));
  const __m256i row_hi = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(r >> 32)));
  const __m256i lane_ids = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  int64_t c = first;
  for (; c + 8 <= groups; c += 8) {
    __m256i c0 = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(c))), lane_ids);
    __m256i c1 = row_lo, c2 = row_hi, c3 = _mm256_setzero_si256();
    uint32_t k0 = static_cast<uint32_t>(s), k1 = static_cast<uint32_t>(s >> 32);
    for (int round = 0; round < 10; ++round) {
      __m256i hi0, lo0, hi1, lo1;
      philox_mulhilo8(c0, m0, hi0, lo0);
      philox_mulhilo8(c2, m1, hi1, lo1);
      c0 = _mm256_xor_si256(_mm256_xor_si256(hi1, c1), _mm256_set1_epi32(static_cast<int>(k0)));
      c2 = _mm256_xor_si256(_mm256_xor_si256(hi0, c3), _mm256_set1_epi32(static_cast<int>(k1)));
      c1 = lo1;
      c3 = lo0;
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    // c_lane[g] is word `lane` of group g; store group-major: out[4 g + lane].
    const __m256 f0 = _mm256_castsi256_ps(c0), f1 = _mm256_castsi256_ps(c1);
    const __m256 f2 = _mm256_castsi256_ps(c2), f3 = _mm256_castsi256_ps(c3);
    const __m256 t0 = _mm256_unpacklo_ps(f0, f1), t1 = _mm256_unpackhi_ps(f0, f1);
    const __m256 t2 = _mm256_unpacklo_ps(f2, f3), t3 = _mm256_unpackhi_ps(f2, f3);
    const __m256 g04 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(1, 0, 1, 0));
    const __m256 g15 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(3, 2, 3, 2));
    const __m256 g26 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(1, 0, 1, 0));
    const __m256 g37 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(3, 2, 3, 2));
    float* dst = reinterpret_cast<float*>(out + 4 * c);
    _mm256_storeu_ps(dst + 0, _mm256_permute2f128_ps(g04, g15, 0x20));
    _mm256_storeu_ps(dst + 8, _mm256_permute2f128_ps(g26, g37, 0x20));
    _mm256_storeu_ps(dst + 16, _mm256_permute2f128_ps(g04, g15, 0x31));
    _mm256_storeu_ps(dst + 24, _mm256_permute2f128_ps(g26, g37, 0x31));
  }
  return c;
}

__attribute__((target("avx512f"))) inline void philox_mulhilo16(__m512i a, __m512i m, __m512i& hi,
                                                               __m512i& lo) {
  const __m512i even = _mm512_mul_epu32(a, m);                        // 32-bit lanes 0, 2, ...
  const __m512i odd = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), m);  // 32-bit lanes 1, 3, ...
  lo = _mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
  hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
}

// The AVX2 version's contract with 16 groups per step.
__attribute__((target("avx512f"))) inline int64_t philox_row_bits_avx512(int64_t seed, int64_t row,
                                                                         int64_t first,
                                                                         int64_t groups,
                                                                         uint32_t* out) {
  const uint64_t s = static_cast<uint64_t>(seed), r = static_cast<uint64_t>(row);
  const __m512i m0 = _mm512_set1_epi32(static_cast<int>(0xD2511F53u));
  const __m512i m1 = _mm512_set1_epi32(static_cast<int>(0xCD9E8D57u));
  const __m512i row_lo = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(r)));
  const __m512i row_hi = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(r >> 32)));
  const __m512i lane_ids = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  int64_t c = first;
  for (; c + 16 <= groups; c += 16) {
    __m512i c0 = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(c))),
                                  lane_ids);
    __m512i c1 = row_lo, c2 = row_hi, c3 = _mm512_setzero_si512();
    uint32_t k0 = static_cast<uint32_t>(s), k1 = static_cast<uint32_t>(s >> 32);
    for (int round = 0; round < 10; ++round) {
      __m512i hi0, lo0, hi1, lo1;
      philox_mulhilo16(c0, m0, hi0, lo0);
      philox_mulhilo16(c2, m1, hi1, lo1);
      c0 = _mm512_xor_si512(_mm512_xor_si512(hi1, c1), _mm512_set1_epi32(static_cast<int>(k0)));
      c2 = _mm512_xor_si512(_mm512_xor_si512(hi0, c3), _mm512_set1_epi32(static_cast<int>(k1)));
      c1 = lo1;
      c3 = lo0;
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    // Word `lane` of group g sits in c_lane[g]; store group-major (out[4 g + lane]). The unpacks
    // leave groups {0, 4, 8, 12} in g0 (one per 128-bit lane), {1, 5, 9, 13} in g1, and so on.
    const __m512i t0 = _mm512_unpacklo_epi32(c0, c1), t1 = _mm512_unpackhi_epi32(c0, c1);
    const __m512i t2 = _mm512_unpacklo_epi32(c2, c3), t3 = _mm512_unpackhi_epi32(c2, c3);
    const __m512i g0 = _mm512_unpacklo_epi64(t0, t2), g1 = _mm512_unpackhi_epi64(t0, t2);
    const __m512i g2 = _mm512_unpacklo_epi64(t1, t3), g3 = _mm512_unpackhi_epi64(t1, t3);
    const __m512i lo01 = _mm512_shuffle_i32x4(g0, g1, 0x44);
    const __m512i lo23 = _mm512_shuffle_i32x4(g2, g3, 0x44);
    const __m512i hi01 = _mm512_shuffle_i32x4(g0, g1, 0xEE);
    const __m512i hi23 = _mm512_shuffle_i32x4(g2, g3, 0xEE);
    uint32_t* dst = out + 4 * c;
    _mm512_storeu_si512(dst + 0, _mm512_shuffle_i32x4(lo01, lo23, 0x88));
    _mm512_storeu_si512(dst + 16, _mm512_shuffle_i32x4(lo01, lo23, 0xDD));
    _mm512_storeu_si512(dst + 32, _mm512_shuffle_i32x4(hi01, hi23, 0x88));
    _mm512_storeu_si512(dst + 48, _mm512_shuffle_i32x4(hi01, hi23, 0xDD));
  }
  return c;
}
#endif

// Words a row of `width` elements needs: one Philox call (4 words) per 8 elements.
inline int64_t dropout_row_words(int64_t width) {
  return (width + kDropoutFieldsPerCall - 1) / kDropoutFieldsPerCall * 4;
}

// The bits of one row's mask: out must hold dropout_row_words(width) words.
inline void philox_row_bits(int64_t seed, int64_t row, int64_t width, uint32_t* out) {
  const int64_t groups = dropout_row_words(width) / 4;
  int64_t done = 0;
#ifdef PK_X86_AVX2
  if (have_avx512()) done = philox_row_bits_avx512(seed, row, done, groups, out);
  if (have_avx2_fma()) done = philox_row_bits_avx2(seed, row, done, groups, out);
#endif
  philox_row_bits_scalar(seed, row, done, groups, out);
}

// out[i] = keep ? scale * x[i] : 0, and keep_out[i] = keep ? scale : 0 if keep_out != nullptr,
// keep meaning field i of the row's bits (see dropout_field) >= threshold.
template <typename T>
inline void apply_row_mask_generic(const uint32_t* bits, uint32_t threshold, T scale, const T* x,
                                   T* out, T* keep_out, int64_t width) {
  // Fields < 2^16, so the signed comparisons below are exact and vectorise.
  const int32_t thr = static_cast<int32_t>(threshold);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
  // Field i is the i-th uint16 of the words in memory order.
  const uint16_t* fields = reinterpret_cast<const uint16_t*>(bits);
  for (int64_t i = 0; i < width; ++i) {
    const T k = static_cast<int32_t>(fields[i]) >= thr ? scale : T(0);
    out[i] = k * x[i];
    if (keep_out) keep_out[i] = k;
  }
#else
  for (int64_t i = 0; i < width; ++i) {
    const int32_t field = static_cast<int32_t>((bits[i >> 1] >> (16 * (i & 1))) & 0xFFFFu);
    const T k = field >= thr ? scale : T(0);
    out[i] = k * x[i];
    if (keep_out) keep_out[i] = k;
  }
#endif
}

#ifdef PK_X86_AVX2
template <typename T>
__attribute__((target("avx2"))) void apply_row_mask_avx2(const uint32_t* bits, uint32_t threshold,
                                                         T scale, const T* x, T* out, T* keep_out,
                                                         int64_t width) {
  apply_row_mask_generic<T>(bits, threshold, scale, x, out, keep_out, width);
}
#endif

template <typename T>
inline void apply_row_mask(const uint32_t* bits, uint32_t threshold, T scale, const T* x, T* out,
                           T* keep_out, int64_t width) {
#ifdef PK_X86_AVX2
  if (have_avx2_fma()) return apply_row_mask_avx2<T>(bits, threshold, scale, x, out, keep_out, width);
#endif
  apply_row_mask_generic<T>(bits, threshold, scale, x, out, keep_out, width);
}

}  // namespace peft_kernels::cpu
