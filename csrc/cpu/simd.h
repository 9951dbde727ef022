// 32-byte vectors through GCC vector extensions: element-wise arithmetic and selects with no
// intrinsics, so the same code is one AVX2 register per operation in a target("avx2,fma") clone
// and two SSE registers in the baseline x86-64 build.
#pragma once
#include <cstdint>
#include <cstring>

#define PK_SIMD_INLINE inline __attribute__((always_inline))
// The helpers are always inlined, so the ABI of passing a 32-byte vector by value (which GCC warns
// differs with and without AVX) never applies.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace peft_kernels::cpu {

template <typename T>
struct VecTraits;
template <>
struct VecTraits<float> {
  typedef float V __attribute__((vector_size(32)));
  typedef int32_t I __attribute__((vector_size(32)));
  static constexpr int kLanes = 8;
};
template <>
struct VecTraits<double> {
  typedef double V __attribute__((vector_size(32)));
  typedef int64_t I __attribute__((vector_size(32)));
  static constexpr int kLanes = 4;
};

template <typename T>
using Vec = typename VecTraits<T>::V;
template <typename T>
constexpr int kLanes = VecTraits<T>::kLanes;

template <typename T>
PK_SIMD_INLINE Vec<T> load(const T* p) {
  Vec<T> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <typename T>
PK_SIMD_INLINE void store(T* p, const Vec<T>& v) {
  std::memcpy(p, &v, sizeof(v));
}
// The first n < lanes elements, the rest zero (a row's last partial vector).
template <typename T>
PK_SIMD_INLINE Vec<T> load_part(const T* p, int64_t n) {
  Vec<T> v = {};
  std::memcpy(&v, p, sizeof(T) * n);
  return v;
}
template <typename T>
PK_SIMD_INLINE void store_part(T* p, const Vec<T>& v, int64_t n) {
  std::memcpy(p, &v, sizeof(T) * n);
}
template <typename T>
PK_SIMD_INLINE T lane_sum(const Vec<T>& v) {
  T total = T(0);
  for (int l = 0; l < kLanes<T>; ++l) total += v[l];
  return total;
}

}  // namespace peft_kernels::cpu
