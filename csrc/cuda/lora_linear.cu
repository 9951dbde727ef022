// CUDA side of the fused low-rank linear: the dropout mask of the adapter branch.
//
// Every product of the op (also the rank-r ones) goes through cuBLAS from csrc/ops/lora_linear.cpp:
// on an H200 the tensor-core GEMMs read the [N, in] / [N, out] activations at close to memory
// speed (about 20 us for N = 8192, in = 4096, r = 16, bfloat16), where SIMT tile kernels for the
// same skinny products measured 157-177 us (r = 16) and up to 1.27 ms (r = 64). What cuBLAS
// cannot do is the dropout, so this kernel applies the keep mask, regenerated from (seed, row,
// column group) exactly as the CPU kernels do, to a block of rows: the forward shrink and the dA
// product run on bounded row chunks of mask * x, and dx's adapter share is masked in place. The
// 1 / (1 - p) scale is left to the float32 side of the products (zeroing is exact, so the half
// types see no extra rounding).

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "cuda/elem.cuh"
#include "kernels/lora_linear.h"

namespace peft_kernels {
namespace {

using cu::AccT;
using cu::Elem;

constexpr int kThreads = 256;

template <typename T>
struct alignas(4 * sizeof(T) <= 16 ? 4 * sizeof(T) : 16) Vec4 {
  T v[4];
};

// One thread per 8-column group (one Philox call gives the group's eight keep fields); blocks tile
// the columns in x and stride over the rows in y, so no thread divides a 64-bit index (a
// grid-stride loop over row * groups + group measured 23 us per 16 MB chunk, ~3x the copy time).
// src may be dst (dx is masked in place), so neither is __restrict__.
template <typename T, bool kVec>
__global__ void __launch_bounds__(kThreads)
    lora_dropout_kernel(const T* src, T* dst, int64_t rows, int64_t cols,
                        int64_t row0, const int64_t* __restrict__ seed_ptr, uint32_t threshold) {
  const T zero = Elem<T>::store(AccT<T>(0));
  const int64_t col8 = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x;
  const int64_t col = kDropoutFieldsPerCall * col8;
  if (col >= cols) return;
  const int64_t seed = *seed_ptr;
  const int n = static_cast<int>(cols - col < kDropoutFieldsPerCall ? cols - col
                                                                     : kDropoutFieldsPerCall);
  for (int64_t row = blockIdx.y; row < rows; row += gridDim.y) {
    const Philox4 bits = dropout_bits(seed, row0 + row, col8);
    const int64_t offset = row * cols + col;
    if (kVec) {  // cols % 4 == 0 and aligned rows: each 4-column half is one vector (n is 4 or 8)
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        if (4 * half < n) {
          Vec4<T> v = *reinterpret_cast<const Vec4<T>*>(src + offset + 4 * half);
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            // Dropped values are exactly 0 (never x * 0, which is NaN for inf x).
            if (!dropout_keep(dropout_field(bits, 4 * half + e), threshold)) v.v[e] = zero;
          }
          *reinterpret_cast<Vec4<T>*>(dst + offset + 4 * half) = v;
        }
      }
    } else {
#pragma unroll
      for (int e = 0; e < kDropoutFieldsPerCall; ++e) {
        if (e < n) {
          dst[offset + e] = dropout_keep(dropout_field(bits, e), threshold) ? src[offset + e] : zero;
        }
      }
    }
  }
}

template <typename T>
void launch(const LoraDropoutParams& p, cudaStream_t stream) {
  const T* src = static_cast<const T*>(p.src);
  T* dst = static_cast<T*>(p.dst);
  const int64_t groups_per_row = (p.cols + kDropoutFieldsPerCall - 1) / kDropoutFieldsPerCall;
  const dim3 grid(static_cast<unsigned>((groups_per_row + kThreads - 1) / kThreads),
                  static_cast<unsigned>(std::min<int64_t>(p.rows, 65535)));
  const auto aligned = [&](const void* ptr) {
    return reinterpret_cast<uintptr_t>(ptr) % alignof(Vec4<T>) == 0;
  };
  if (p.cols % 4 == 0 && aligned(src) && aligned(dst)) {
    lora_dropout_kernel<T, true><<<grid, kThreads, 0, stream>>>(
        src, dst, p.rows, p.cols, p.row0, p.dropout.seed, p.dropout.threshold);
  } else {
    lora_dropout_kernel<T, false><<<grid, kThreads, 0, stream>>>(
        src, dst, p.rows, p.cols, p.row0, p.dropout.seed, p.dropout.threshold);
  }
}

// dst[i, 0:r] = rn(scale * src[i, :]), dst[i, r:2r] = rn(scale * src[i, :] - dst[i, 0:r]); the
// low part is 0 where the high part overflowed, so the product keeps the unfused layer's +-Inf
// rather than Inf - Inf = NaN.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    lora_rank_pair_kernel(const float* __restrict__ src, T* __restrict__ dst, int64_t rows,
                          int64_t r, float scale) {
  const int64_t total = rows * r;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t row = i / r, k = i - row * r;
    const float v = scale * src[i];
    const T hi = Elem<T>::store(v);
    dst[row * 2 * r + k] = hi;
    const float hi_value = Elem<T>::load(hi);
    dst[row * 2 * r + r + k] = Elem<T>::store(isfinite(hi_value) ? v - hi_value : 0.0f);
  }
}

}  // namespace

void lora_dropout_cuda(const LoraDropoutParams& p, cudaStream_t stream) {
  if (p.rows <= 0 || p.cols <= 0) return;
  switch (p.dtype) {
    case DType::kFloat32: launch<float>(p, stream); break;
    case DType::kFloat64: launch<double>(p, stream); break;
    case DType::kFloat16: launch<__half>(p, stream); break;
    case DType::kBFloat16: launch<__nv_bfloat16>(p, stream); break;
  }
}

}  // namespace peft_kernels

namespace peft_kernels {

void lora_rank_pair_cuda(const LoraRankPairParams& p, cudaStream_t stream) {
  const int64_t total = p.rows * p.r;
  if (total <= 0) return;
  const auto blocks =
      static_cast<unsigned>(std::min<int64_t>((total + kThreads - 1) / kThreads, 4096));
  const float* src = static_cast<const float*>(p.src);
  const float scale = static_cast<float>(p.scale);
  if (p.dtype == DType::kBFloat16) {
    lora_rank_pair_kernel<<<blocks, kThreads, 0, stream>>>(
        src, static_cast<__nv_bfloat16*>(p.dst), p.rows, p.r, scale);
  } else {
    lora_rank_pair_kernel<<<blocks, kThreads, 0, stream>>>(src, static_cast<__half*>(p.dst),
                                                           p.rows, p.r, scale);
  }
}

}  // namespace peft_kernels
