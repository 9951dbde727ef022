// CPU kernels of the fused low-rank adapter matmul (see csrc/kernels/lora_linear.h).
// Rows are processed in blocks small enough to stay in L2: each block of x or dy is read from
// memory once and feeds every rank-r product of that pass through BLAS on the cached block.
#include "kernels/lora_linear.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <vector>

#include "cpu/blas.h"
#include "cpu/philox.h"

namespace peft_kernels {
namespace {

using cpu::gemm_rowmajor;

// Rows per block so one block of a [*, width] matrix is about 512 KiB: it stays in cache between
// the products of a pass. Blocks run in sequence and BLAS threads each product; only elementwise
// work runs inside at::parallel_for, because BLAS called from inside a parallel region upsets
// MKL's dynamic threading (measured: 2-10x slower and erratic on later GEMMs).
template <typename T>
int64_t rows_per_block(int64_t width) {
  const int64_t bytes = std::max<int64_t>(width, 1) * static_cast<int64_t>(sizeof(T));
  return std::clamp<int64_t>((512 * 1024) / bytes, 16, 4096);
}

// For rows [n0, n0 + rows): keep = mask scales (if keep != nullptr) and dropped = keep * x.
template <typename T>
void dropout_block(const T* x, int64_t n0, int64_t rows, int64_t width, const DropoutParams& d,
                   T* keep, T* dropped) {
  const int64_t seed = *d.seed;
  const T scale = static_cast<T>(d.scale);
  const uint32_t threshold = d.threshold;
  at::parallel_for(0, rows, 8, [&](int64_t b, int64_t e) {
    std::vector<uint32_t> bits((width + 3) / 4 * 4);
    for (int64_t n = b; n < e; ++n) {
      cpu::philox_row_bits(seed, n0 + n, width, bits.data());
      const T* xrow = x + (n0 + n) * width;
      T* out = dropped + n * width;
      T* k = keep ? keep + n * width : nullptr;
      for (int64_t i = 0; i < width; ++i) {
        const T s = dropout_keep(bits[i], threshold) ? scale : T(0);
        out[i] = s * xrow[i];
        if (k) k[i] = s;
      }
    }
  });
}

template <typename T>
void shrink_impl(const LoraShrinkParams& p) {
  const T* x = static_cast<const T*>(p.x);
  const T* A = static_cast<const T*>(p.A);
  T* pre = static_cast<T*>(p.pre);
  if (!p.dropout.enabled()) {
    gemm_rowmajor<T>(false, true, p.N, p.r, p.in, T(1), x, p.in, A, p.in, T(0), pre, p.r);
    return;
  }
  const int64_t bm = rows_per_block<T>(p.in);
  std::vector<T> dropped(std::min(bm, p.N) * p.in);
  for (int64_t n0 = 0; n0 < p.N; n0 += bm) {
    const int64_t rows = std::min(bm, p.N - n0);
    dropout_block<T>(x, n0, rows, p.in, p.dropout, nullptr, dropped.data());
    gemm_rowmajor<T>(false, true, rows, p.r, p.in, T(1), dropped.data(), p.in, A, p.in, T(0),
                     pre + n0 * p.r, p.r);
  }
}

template <typename T>
void dy_pass_impl(const LoraDyPassParams& p) {
  const T* dy = static_cast<const T*>(p.dy);
  const T* B = static_cast<const T*>(p.B);
  const T* a = static_cast<const T*>(p.a);
  T* g = static_cast<T*>(p.g);
  T* dB = static_cast<T*>(p.dB);
  T* dbias = static_cast<T*>(p.dbias);
  const int64_t bm = rows_per_block<T>(p.out);
  for (int64_t n0 = 0; n0 < p.N; n0 += bm) {
    const int64_t rows = std::min(bm, p.N - n0);
    const T* dy_blk = dy + n0 * p.out;
    // g_blk = dy_blk B, then dB += dy_blk^T a_blk while dy_blk is still in cache.
    gemm_rowmajor<T>(false, false, rows, p.r, p.out, T(1), dy_blk, p.out, B, p.r, T(0),
                     g + n0 * p.r, p.r);
    gemm_rowmajor<T>(true, false, p.out, p.r, rows, T(1), dy_blk, p.out, a + n0 * p.r, p.r,
                     n0 == 0 ? T(0) : T(1), dB, p.r);
    if (dbias) {
      at::parallel_for(0, p.out, 256, [&](int64_t o0, int64_t o1) {
        for (int64_t n = 0; n < rows; ++n) {
          const T* row = dy_blk + n * p.out;
          for (int64_t o = o0; o < o1; ++o) dbias[o] = (n0 == 0 && n == 0 ? T(0) : dbias[o]) + row[o];
        }
      });
    }
  }
  if (p.N == 0) {
    std::fill(dB, dB + p.out * p.r, T(0));
    if (dbias) std::fill(dbias, dbias + p.out, T(0));
  }
}

template <typename T>
void x_pass_impl(const LoraXPassParams& p) {
  const T* x = static_cast<const T*>(p.x);
  const T* A = static_cast<const T*>(p.A);
  const T* dpre = static_cast<const T*>(p.dpre);
  T* dA = static_cast<T*>(p.dA);
  T* dx = static_cast<T*>(p.dx);
  const bool dropout = p.dropout.enabled();
  if (!dropout) {
    // No mask to share between the products: each is one BLAS call over all rows.
    gemm_rowmajor<T>(true, false, p.r, p.in, p.N, T(1), dpre, p.r, x, p.in, T(0), dA, p.in);
    if (dx) gemm_rowmajor<T>(false, false, p.N, p.in, p.r, T(1), dpre, p.r, A, p.in, T(0), dx, p.in);
    return;
  }
  const int64_t bm = rows_per_block<T>(p.in);
  const int64_t cap = std::min(bm, p.N) * p.in;
  std::vector<T> keep(cap), dropped(cap);
  for (int64_t n0 = 0; n0 < p.N; n0 += bm) {
    const int64_t rows = std::min(bm, p.N - n0);
    dropout_block<T>(x, n0, rows, p.in, p.dropout, keep.data(), dropped.data());
    gemm_rowmajor<T>(true, false, p.r, p.in, rows, T(1), dpre + n0 * p.r, p.r, dropped.data(),
                     p.in, n0 == 0 ? T(0) : T(1), dA, p.in);
    if (dx) {
      T* dx_blk = dx + n0 * p.in;
      gemm_rowmajor<T>(false, false, rows, p.in, p.r, T(1), dpre + n0 * p.r, p.r, A, p.in, T(0),
                       dx_blk, p.in);
      at::parallel_for(0, rows * p.in, 16384, [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; ++i) dx_blk[i] *= keep[i];
      });
    }
  }
  if (p.N == 0) std::fill(dA, dA + p.r * p.in, T(0));
}

template <template <typename> class Fn, typename Params>
void dispatch_cpu(const Params& p, const char* name) {
  switch (p.dtype) {
    case DType::kFloat32: return Fn<float>::run(p);
    case DType::kFloat64: return Fn<double>::run(p);
    default: TORCH_CHECK(false, name, ": the CPU kernels support float32 and float64");
  }
}

template <typename T> struct Shrink { static void run(const LoraShrinkParams& p) { shrink_impl<T>(p); } };
template <typename T> struct DyPass { static void run(const LoraDyPassParams& p) { dy_pass_impl<T>(p); } };
template <typename T> struct XPass { static void run(const LoraXPassParams& p) { x_pass_impl<T>(p); } };

}  // namespace

void lora_shrink_cpu(const LoraShrinkParams& p) { dispatch_cpu<Shrink>(p, "lora_linear"); }
void lora_dy_pass_cpu(const LoraDyPassParams& p) { dispatch_cpu<DyPass>(p, "lora_linear"); }
void lora_x_pass_cpu(const LoraXPassParams& p) { dispatch_cpu<XPass>(p, "lora_linear"); }

}  // namespace peft_kernels
