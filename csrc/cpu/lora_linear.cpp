// CPU kernels of the fused low-rank adapter matmul (see csrc/kernels/lora_linear.h).
// Each pass streams its long operand (x or dy) once, in row blocks that stay in cache, through
// the register-blocked rank-r micro-kernels of cpu/lowrank.h. Threads own contiguous row ranges
// and private partial sums for the reductions over rows (dA, dB, dbias), added in a fixed order.
#include "kernels/lora_linear.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <vector>

#include "cpu/lowrank_dispatch.h"
#include "cpu/philox.h"

namespace peft_kernels {
namespace {

using cpu::expand;
using cpu::padded;
using cpu::project;
using cpu::rank_lanes;
using cpu::reduce;
using cpu::round_up;
using cpu::unaliased_ld;

// ----------------------------------------------------------------------------------- helpers
// Rows per block so a block of a [*, width] operand (about 256 KiB) stays in L2 across the
// rank tiles of a pass.
template <typename T>
int64_t rows_per_block(int64_t width) {
  const int64_t bytes = std::max<int64_t>(width, 1) * static_cast<int64_t>(sizeof(T));
  return std::clamp<int64_t>((256 * 1024) / bytes, 4, 1024);
}

// Contiguous row ranges, one per worker, each with its own partial-sum slot.
struct RowChunks {
  int64_t count, N;
  int64_t begin(int64_t c) const { return N * c / count; }
  int64_t end(int64_t c) const { return N * (c + 1) / count; }
};

RowChunks row_chunks(int64_t N) {
  return RowChunks{std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), N / 16)), N};
}

// out[c * size + i] summed over c into dst (fixed order: the result does not depend on timing).
template <typename T>
void sum_chunks(const std::vector<T>& partial, int64_t chunks, int64_t rows, int64_t cols,
                int64_t ld, T* dst) {
  at::parallel_for(0, rows, 64, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      for (int64_t j = 0; j < cols; ++j) {
        T acc = 0;
        for (int64_t c = 0; c < chunks; ++c) acc += partial[(c * rows + i) * ld + j];
        dst[i * cols + j] = acc;
      }
    }
  });
}

// Dropout for rows [n0, n0 + rows): dropped = keep * x, and the keep scales if asked.
template <typename T>
void dropout_rows(const T* x, int64_t n0, int64_t rows, int64_t width, const DropoutParams& d,
                  T* keep, T* dropped, int64_t ld_dropped, std::vector<uint32_t>& bits) {
  const int64_t seed = *d.seed;
  const T scale = static_cast<T>(d.scale);
  bits.resize(cpu::dropout_row_words(width));
  for (int64_t n = 0; n < rows; ++n) {
    cpu::philox_row_bits(seed, n0 + n, width, bits.data());
    cpu::apply_row_mask<T>(bits.data(), d.threshold, scale, x + (n0 + n) * width,
                           dropped + n * ld_dropped, keep ? keep + n * width : nullptr, width);
  }
}

// ------------------------------------------------------------------------------------ passes
template <typename T>
void shrink_impl(const LoraShrinkParams& p) {
  const T* x = static_cast<const T*>(p.x);
  T* pre = static_cast<T*>(p.pre);
  const int64_t RP = round_up(p.r, rank_lanes<T>());
  const std::vector<T> At = padded(static_cast<const T*>(p.A), p.r, p.in, RP, true);  // [in, RP]
  std::vector<T> pre_padded(RP == p.r ? 0 : p.N * RP);
  T* C = RP == p.r ? pre : pre_padded.data();
  const int64_t bm = rows_per_block<T>(p.in);
  const RowChunks chunks = row_chunks(p.N);
  at::parallel_for(0, chunks.count, 1, [&](int64_t c0, int64_t c1) {
    std::vector<T> dropped(p.dropout.enabled() ? bm * p.in : 0);
    std::vector<uint32_t> bits;
    for (int64_t c = c0; c < c1; ++c) {
      for (int64_t n0 = chunks.begin(c); n0 < chunks.end(c); n0 += bm) {
        const int64_t rows = std::min(bm, chunks.end(c) - n0);
        const T* P = x + n0 * p.in;
        if (p.dropout.enabled()) {
          dropout_rows<T>(x, n0, rows, p.in, p.dropout, nullptr, dropped.data(), p.in, bits);
          P = dropped.data();
        }
        project<T>(P, p.in, rows, p.in, At.data(), RP, C + n0 * RP, nullptr, nullptr, nullptr);
      }
    }
  });
  if (RP != p.r) {
    for (int64_t n = 0; n < p.N; ++n) std::copy(C + n * RP, C + n * RP + p.r, pre + n * p.r);
  }
}

template <typename T>
void dy_pass_impl(const LoraDyPassParams& p) {
  const T* dy = static_cast<const T*>(p.dy);
  const T* a = static_cast<const T*>(p.a);
  const T* x = static_cast<const T*>(p.x);  // set: form a from x, reduce dA too (see the header)
  T* g = static_cast<T*>(p.g);
  const int64_t RP = round_up(p.r, rank_lanes<T>());
  const bool pad = RP != p.r;
  const std::vector<T> Bp = padded(static_cast<const T*>(p.B), p.out, p.r, RP, false);
  const std::vector<T> At = x ? padded(static_cast<const T*>(p.A), p.r, p.in, RP, true)
                              : std::vector<T>();  // [in, RP]
  std::vector<T> g_padded(!x && pad ? p.N * RP : 0);
  T* G = pad ? g_padded.data() : g;
  const RowChunks chunks = row_chunks(p.N);
  // dB^T [r, out] partials: the row reduction runs along out, dy's contiguous dimension.
  const int64_t ldb = unaliased_ld<T>(p.out), lda = unaliased_ld<T>(p.in);
  std::vector<T> dbt_partial(chunks.count * p.r * ldb, T(0));
  std::vector<T> da_partial(x ? chunks.count * p.r * lda : 0, T(0));
  std::vector<T> bias_partial(p.dbias ? chunks.count * p.out : 0, T(0));
  // A block of dy (and of x) rows stays in L2 across the products that read it.
  const int64_t bm = rows_per_block<T>(x ? p.out + p.in : p.out);
  at::parallel_for(0, chunks.count, 1, [&](int64_t c0, int64_t c1) {
    std::vector<T> g_blk(x ? bm * RP : 0), pre_blk(x ? bm * RP : 0);
    for (int64_t c = c0; c < c1; ++c) {
      T* dbt_c = dbt_partial.data() + c * p.r * ldb;
      T* bias_c = p.dbias ? bias_partial.data() + c * p.out : nullptr;
      for (int64_t n0 = chunks.begin(c); n0 < chunks.end(c); n0 += bm) {
        const int64_t rows = std::min(bm, chunks.end(c) - n0);
        const T* dy_blk = dy + n0 * p.out;
        if (x) {
          // pre and g of the block; the scaling goes on the summed partials.
          const T* x_blk = x + n0 * p.in;
          project<T>(dy_blk, p.out, rows, p.out, Bp.data(), RP, g_blk.data(), nullptr, nullptr, bias_c);
          project<T>(x_blk, p.in, rows, p.in, At.data(), RP, pre_blk.data(), nullptr, nullptr, nullptr);
          reduce<T>(pre_blk.data(), RP, p.r, dy_blk, p.out, p.out, rows, dbt_c, ldb);
          reduce<T>(g_blk.data(), RP, p.r, x_blk, p.in, p.in, rows,
                    da_partial.data() + c * p.r * lda, lda);
        } else {
          // Both products read the same cached block of dy.
          project<T>(dy_blk, p.out, rows, p.out, Bp.data(), RP, G + n0 * RP, nullptr, nullptr, bias_c);
          reduce<T>(a + n0 * p.r, p.r, p.r, dy_blk, p.out, p.out, rows, dbt_c, ldb);
        }
      }
    }
  });
  if (!x && pad) {
    for (int64_t n = 0; n < p.N; ++n) std::copy(G + n * RP, G + n * RP + p.r, g + n * p.r);
  }
  const T scale = x ? static_cast<T>(p.scaling) : T(1);
  std::vector<T> dbt(p.r * p.out);
  sum_chunks<T>(dbt_partial, chunks.count, p.r, p.out, ldb, dbt.data());
  T* dB = static_cast<T*>(p.dB);
  for (int64_t k = 0; k < p.r; ++k)
    for (int64_t o = 0; o < p.out; ++o) dB[o * p.r + k] = scale * dbt[k * p.out + o];
  if (x) {
    T* dA = static_cast<T*>(p.dA);
    sum_chunks<T>(da_partial, chunks.count, p.r, p.in, lda, dA);
    for (int64_t i = 0; i < p.r * p.in; ++i) dA[i] *= scale;
  }
  if (p.dbias) sum_chunks<T>(bias_partial, chunks.count, p.out, 1, 1, static_cast<T*>(p.dbias));
}

template <typename T>
void x_pass_impl(const LoraXPassParams& p) {
  const T* x = static_cast<const T*>(p.x);
  const T* A = static_cast<const T*>(p.A);
  const T* dpre = static_cast<const T*>(p.dpre);
  T* dx = static_cast<T*>(p.dx);
  const bool dropout = p.dropout.enabled();
  const RowChunks chunks = row_chunks(p.N);
  const int64_t lda = unaliased_ld<T>(p.in);
  std::vector<T> da_partial(chunks.count * p.r * lda, T(0));
  const int64_t bm = rows_per_block<T>(p.in);
  at::parallel_for(0, chunks.count, 1, [&](int64_t c0, int64_t c1) {
    // The dropped block gets a leading dimension off multiples of 4 KiB (see cpu::avx2::reduce_rows).
    const int64_t ld = p.in + (((p.in * static_cast<int64_t>(sizeof(T))) % 4096 == 0) ? 64 / sizeof(T) : 0);
    std::vector<T> keep(dropout && dx ? bm * p.in : 0), dropped(dropout ? bm * ld : 0);
    std::vector<uint32_t> bits;
    for (int64_t c = c0; c < c1; ++c) {
      T* da_c = da_partial.data() + c * p.r * lda;
      for (int64_t n0 = chunks.begin(c); n0 < chunks.end(c); n0 += bm) {
        const int64_t rows = std::min(bm, chunks.end(c) - n0);
        const T* X = x + n0 * p.in;
        int64_t ldx = p.in;
        if (dropout) {
          dropout_rows<T>(x, n0, rows, p.in, p.dropout, dx ? keep.data() : nullptr,
                          dropped.data(), ld, bits);
          X = dropped.data();
          ldx = ld;
        }
        reduce<T>(dpre + n0 * p.r, p.r, p.r, X, ldx, p.in, rows, da_c, lda);
        if (dx) {
          expand<T>(dpre + n0 * p.r, p.r, p.r, A, p.in, nullptr, dropout ? keep.data() : nullptr,
                    dx + n0 * p.in, nullptr, nullptr, 0, rows);
        }
      }
    }
  });
  sum_chunks<T>(da_partial, chunks.count, p.r, p.in, lda, static_cast<T*>(p.dA));
}

template <typename T>
void expand_impl(const LoraExpandParams& p) {
  const std::vector<T> Bt = padded(static_cast<const T*>(p.B), p.out, p.r, p.out, true);  // [r, out]
  const T* a = static_cast<const T*>(p.a);
  const T* bias = static_cast<const T*>(p.bias);
  T* y = static_cast<T*>(p.y);
  at::parallel_for(0, p.N, 16, [&](int64_t n0, int64_t n1) {
    expand<T>(a, p.r, p.r, Bt.data(), p.out, bias, nullptr, y, nullptr, nullptr, n0, n1);
  });
}

template <template <typename> class Fn, typename Params>
void dispatch_cpu(const Params& p) {
  switch (p.dtype) {
    case DType::kFloat32: return Fn<float>::run(p);
    case DType::kFloat64: return Fn<double>::run(p);
    default: TORCH_CHECK(false, "lora_linear: the CPU kernels support float32 and float64");
  }
}

template <typename T> struct Shrink { static void run(const LoraShrinkParams& p) { shrink_impl<T>(p); } };
template <typename T> struct DyPass { static void run(const LoraDyPassParams& p) { dy_pass_impl<T>(p); } };
template <typename T> struct XPass { static void run(const LoraXPassParams& p) { x_pass_impl<T>(p); } };
template <typename T> struct Expand { static void run(const LoraExpandParams& p) { expand_impl<T>(p); } };

}  // namespace

void lora_shrink_cpu(const LoraShrinkParams& p) { dispatch_cpu<Shrink>(p); }
void lora_dy_pass_cpu(const LoraDyPassParams& p) { dispatch_cpu<DyPass>(p); }
void lora_x_pass_cpu(const LoraXPassParams& p) { dispatch_cpu<XPass>(p); }
void lora_expand_cpu(const LoraExpandParams& p) { dispatch_cpu<Expand>(p); }

}  // namespace peft_kernels
