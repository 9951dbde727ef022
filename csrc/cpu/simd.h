// 32-byte (or 64-byte) vectors through GCC vector extensions: element-wise arithmetic and
// selects with no intrinsics, so the same code is one AVX2 register per operation in a
// target("avx2,fma") clone, two SSE registers in the baseline x86-64 build, and one AVX-512
// register per 64-byte vector in a target("avx512f") clone.
#pragma once
#include <cstdint>
#include <cstring>

#define PK_SIMD_INLINE inline __attribute__((always_inline))
// The helpers are always inlined, so the ABI of passing a 32-byte vector by value (which GCC warns
// differs with and without AVX) never applies.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace peft_kernels::cpu {

// B: the vector's bytes, 32 (AVX2) by default; 64 in the target("avx512f") clones.
template <typename T, int B = 32>
struct VecTraits;
template <int B>
struct VecTraits<float, B> {
  typedef float V __attribute__((vector_size(B)));
  typedef int32_t I __attribute__((vector_size(B)));
  static constexpr int kLanes = B / 4;
};
template <int B>
struct VecTraits<double, B> {
  typedef double V __attribute__((vector_size(B)));
  typedef int64_t I __attribute__((vector_size(B)));
  static constexpr int kLanes = B / 8;
};

template <typename T, int B = 32>
using Vec = typename VecTraits<T, B>::V;
template <typename T, int B = 32>
constexpr int kLanes = VecTraits<T, B>::kLanes;

template <typename T, int B = 32>
PK_SIMD_INLINE Vec<T, B> load(const T* p) {
  Vec<T, B> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <typename T, int B = 32>
PK_SIMD_INLINE void store(T* p, const Vec<T, B>& v) {
  std::memcpy(p, &v, sizeof(v));
}
// The first n < lanes elements, the rest zero (a row's last partial vector).
template <typename T, int B = 32>
PK_SIMD_INLINE Vec<T, B> load_part(const T* p, int64_t n) {
  Vec<T, B> v = {};
  std::memcpy(&v, p, sizeof(T) * n);
  return v;
}
template <typename T, int B = 32>
PK_SIMD_INLINE void store_part(T* p, const Vec<T, B>& v, int64_t n) {
  std::memcpy(p, &v, sizeof(T) * n);
}
// Halves added pairwise (one extract and one add per level): a serial sum over the lanes is a
// chain of 16 dependent scalar adds for a 64-byte float vector.
template <typename T, int B = 32>
PK_SIMD_INLINE T lane_sum(const Vec<T, B>& v) {
  if constexpr (B == static_cast<int>(sizeof(T))) {
    return v[0];
  } else {
    Vec<T, B / 2> low, high;
    std::memcpy(&low, &v, B / 2);
    std::memcpy(&high, reinterpret_cast<const char*>(&v) + B / 2, B / 2);
    return lane_sum<T, B / 2>(low + high);
  }
}

}  // namespace peft_kernels::cpu
