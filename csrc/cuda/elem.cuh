// Element types of the CUDA kernels: half types load and store through float, everything
// accumulates in Elem<T>::Acc (store_double rounds a double once, straight to T). The build disables the implicit half/bfloat16 conversions, so every
// conversion is an explicit intrinsic. Host-callable too, so thread-block code can be emulated
// on the CPU.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "kernels/common.h"

namespace peft_kernels {
namespace cu {

template <typename T>
struct Elem;
template <>
struct Elem<float> {
  using Acc = float;
  static HOST_DEVICE float load(float v) { return v; }
  static HOST_DEVICE float store(float v) { return v; }
  static HOST_DEVICE float store_double(double v) { return static_cast<float>(v); }
};
template <>
struct Elem<double> {
  using Acc = double;
  static HOST_DEVICE double load(double v) { return v; }
  static HOST_DEVICE double store(double v) { return v; }
  static HOST_DEVICE double store_double(double v) { return v; }
};
template <>
struct Elem<__half> {
  using Acc = float;
  static HOST_DEVICE float load(__half v) { return __half2float(v); }
  static HOST_DEVICE __half store(float v) { return __float2half_rn(v); }
  static HOST_DEVICE __half store_double(double v) { return __double2half(v); }
};
template <>
struct Elem<__nv_bfloat16> {
  using Acc = float;
  static HOST_DEVICE float load(__nv_bfloat16 v) { return __bfloat162float(v); }
  static HOST_DEVICE __nv_bfloat16 store(float v) { return __float2bfloat16_rn(v); }
  static HOST_DEVICE __nv_bfloat16 store_double(double v) { return __double2bfloat16(v); }
};
template <typename T>
using AccT = typename Elem<T>::Acc;

HOST_DEVICE float madd(float a, float b, float c) { return fmaf(a, b, c); }
HOST_DEVICE double madd(double a, double b, double c) { return fma(a, b, c); }

}  // namespace cu
}  // namespace peft_kernels
