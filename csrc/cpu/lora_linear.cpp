// CPU kernels of the fused low-rank adapter matmul (see csrc/kernels/lora_linear.h).
// Rows are processed in blocks small enough to stay in L2: each block of x or dy is read from
// memory once and feeds every rank-r product of that pass through BLAS on the cached block.
#include "kernels/lora_linear.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <vector>

#include "cpu/blas.h"

namespace peft_kernels {
namespace {

using cpu::gemm_rowmajor;

// Rows per block so one block of a [*, width] matrix is about 256 KiB.
template <typename T>
int64_t rows_per_block(int64_t width) {
  const int64_t bytes = std::max<int64_t>(width, 1) * static_cast<int64_t>(sizeof(T));
  return std::clamp<int64_t>((256 * 1024) / bytes, 8, 512);
}

// keep[i] = scale or 0 for the dropout mask of one row (see csrc/kernels/common.h).
template <typename T>
void dropout_row_scales(int64_t seed, int64_t row, int64_t width, uint32_t threshold, T scale,
                        T* keep) {
  const int64_t full = width / 4;
  for (int64_t c = 0; c < full; ++c) {
    const Philox4 bits = dropout_bits(seed, row, c);
    for (int lane = 0; lane < 4; ++lane) {
      keep[4 * c + lane] = dropout_keep(bits.v[lane], threshold) ? scale : T(0);
    }
  }
  if (full * 4 < width) {
    const Philox4 bits = dropout_bits(seed, row, full);
    for (int64_t i = full * 4; i < width; ++i) {
      keep[i] = dropout_keep(bits.v[i - full * 4], threshold) ? scale : T(0);
    }
  }
}

// Splits [0, N) into one contiguous range per worker so each owns one partial-sum slot.
struct RowSplit {
  int64_t chunks;
  int64_t N;
  int64_t begin(int64_t c) const { return N * c / chunks; }
  int64_t end(int64_t c) const { return N * (c + 1) / chunks; }
};

RowSplit split_rows(int64_t N, int64_t min_rows) {
  const int64_t by_size = std::max<int64_t>(1, N / std::max<int64_t>(min_rows, 1));
  return RowSplit{std::min<int64_t>(at::get_num_threads(), by_size), N};
}

template <typename T>
void sum_partials(const std::vector<T>& partials, int64_t chunks, int64_t size, T* out) {
  at::parallel_for(0, size, 4096, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      T acc = 0;
      for (int64_t c = 0; c < chunks; ++c) acc += partials[c * size + i];
      out[i] = acc;
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
  const int64_t seed = *p.dropout.seed;
  const T scale = static_cast<T>(p.dropout.scale);
  const int64_t bm = rows_per_block<T>(p.in);
  const int64_t blocks = (p.N + bm - 1) / bm;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    std::vector<T> dropped(bm * p.in);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n0 = b * bm, rows = std::min(bm, p.N - n0);
      for (int64_t n = 0; n < rows; ++n) {
        T* row = dropped.data() + n * p.in;
        const T* xrow = x + (n0 + n) * p.in;
        dropout_row_scales<T>(seed, n0 + n, p.in, p.dropout.threshold, scale, row);
        for (int64_t i = 0; i < p.in; ++i) row[i] *= xrow[i];
      }
      gemm_rowmajor<T>(false, true, rows, p.r, p.in, T(1), dropped.data(), p.in, A, p.in, T(0),
                       pre + n0 * p.r, p.r);
    }
  });
}

template <typename T>
void dy_pass_impl(const LoraDyPassParams& p) {
  const T* dy = static_cast<const T*>(p.dy);
  const T* B = static_cast<const T*>(p.B);
  const T* a = static_cast<const T*>(p.a);
  T* g = static_cast<T*>(p.g);
  const int64_t bm = rows_per_block<T>(p.out);
  const RowSplit split = split_rows(p.N, bm);
  const int64_t db_size = p.out * p.r;
  std::vector<T> db_partial(split.chunks * db_size, T(0));
  std::vector<T> bias_partial(p.dbias ? split.chunks * p.out : 0, T(0));
  at::parallel_for(0, split.chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      T* db_c = db_partial.data() + c * db_size;
      T* bias_c = p.dbias ? bias_partial.data() + c * p.out : nullptr;
      for (int64_t n0 = split.begin(c); n0 < split.end(c); n0 += bm) {
        const int64_t rows = std::min(bm, split.end(c) - n0);
        const T* dy_blk = dy + n0 * p.out;
        // g_blk = dy_blk B, then dB_c += dy_blk^T a_blk while dy_blk is still in cache.
        gemm_rowmajor<T>(false, false, rows, p.r, p.out, T(1), dy_blk, p.out, B, p.r, T(0),
                         g + n0 * p.r, p.r);
        gemm_rowmajor<T>(true, false, p.out, p.r, rows, T(1), dy_blk, p.out, a + n0 * p.r, p.r,
                         T(1), db_c, p.r);
        if (bias_c) {
          for (int64_t n = 0; n < rows; ++n) {
            const T* row = dy_blk + n * p.out;
            for (int64_t o = 0; o < p.out; ++o) bias_c[o] += row[o];
          }
        }
      }
    }
  });
  sum_partials<T>(db_partial, split.chunks, db_size, static_cast<T*>(p.dB));
  if (p.dbias) sum_partials<T>(bias_partial, split.chunks, p.out, static_cast<T*>(p.dbias));
}

template <typename T>
void x_pass_impl(const LoraXPassParams& p) {
  const T* x = static_cast<const T*>(p.x);
  const T* A = static_cast<const T*>(p.A);
  const T* dpre = static_cast<const T*>(p.dpre);
  T* dx = static_cast<T*>(p.dx);
  const bool dropout = p.dropout.enabled();
  if (!dropout && dx == nullptr) {
    // Nothing to fuse: dA = dpre^T x is one BLAS call over all rows.
    gemm_rowmajor<T>(true, false, p.r, p.in, p.N, T(1), dpre, p.r, x, p.in, T(0),
                     static_cast<T*>(p.dA), p.in);
    return;
  }
  const int64_t seed = dropout ? *p.dropout.seed : 0;
  const T scale = static_cast<T>(p.dropout.scale);
  const int64_t bm = rows_per_block<T>(p.in);
  const RowSplit split = split_rows(p.N, bm);
  const int64_t da_size = p.r * p.in;
  std::vector<T> da_partial(split.chunks * da_size, T(0));
  at::parallel_for(0, split.chunks, 1, [&](int64_t c0, int64_t c1) {
    std::vector<T> keep(dropout ? bm * p.in : 0), dropped(dropout ? bm * p.in : 0);
    for (int64_t c = c0; c < c1; ++c) {
      T* da_c = da_partial.data() + c * da_size;
      for (int64_t n0 = split.begin(c); n0 < split.end(c); n0 += bm) {
        const int64_t rows = std::min(bm, split.end(c) - n0);
        const T* x_blk = x + n0 * p.in;
        if (dropout) {
          for (int64_t n = 0; n < rows; ++n) {
            T* k = keep.data() + n * p.in;
            T* d = dropped.data() + n * p.in;
            const T* xrow = x_blk + n * p.in;
            dropout_row_scales<T>(seed, n0 + n, p.in, p.dropout.threshold, scale, k);
            for (int64_t i = 0; i < p.in; ++i) d[i] = k[i] * xrow[i];
          }
          x_blk = dropped.data();
        }
        gemm_rowmajor<T>(true, false, p.r, p.in, rows, T(1), dpre + n0 * p.r, p.r, x_blk, p.in,
                         T(1), da_c, p.in);
        if (dx) {
          T* dx_blk = dx + n0 * p.in;
          gemm_rowmajor<T>(false, false, rows, p.in, p.r, T(1), dpre + n0 * p.r, p.r, A, p.in,
                           T(0), dx_blk, p.in);
          if (dropout) {
            const T* k = keep.data();
            for (int64_t i = 0; i < rows * p.in; ++i) dx_blk[i] *= k[i];
          }
        }
      }
    }
  });
  sum_partials<T>(da_partial, split.chunks, da_size, static_cast<T*>(p.dA));
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
