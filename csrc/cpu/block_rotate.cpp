// CPU kernels of the block-diagonal rotation (see csrc/kernels/block_rotate.h). A block of b
// features is one short vector (b = 2..32 at compile time, AVX2+FMA clone when the CPU has it):
// rotate is b broadcast-FMAs per block against R's columns, outer keeps one block's b x b sums in
// registers while it streams a tile of rows that stays in L2.
#include "kernels/block_rotate.h"
#include "cpu/cpu_features.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstring>
#include <vector>

namespace peft_kernels {
namespace {

constexpr int64_t kOuterTileRows = 64;
// The row sums of `outer` go into this many fixed chunks, added in order: the result does not
// depend on the number of threads.
constexpr int64_t kOuterChunks = 64;

// ------------------------------------------------------------------ compile-time block sizes
// cols: [k][b][b], cols[blk][j] = column j of the applied matrix, so y = sum_j x_j cols[j].
template <typename T, int B>
__attribute__((always_inline)) inline void rotate_rows_body(const T* __restrict x,
                                                            const T* __restrict cols,
                                                            T* __restrict y, int64_t rows,
                                                            int64_t k) {
  typedef T vec __attribute__((vector_size(sizeof(T) * B)));
  const int64_t ld = k * B;
  for (int64_t n = 0; n < rows; ++n) {
    for (int64_t blk = 0; blk < k; ++blk) {
      const T* col = cols + blk * B * B;
      const T* xb = x + n * ld + blk * B;
      vec acc = vec{};
      _Pragma("GCC unroll 32") for (int j = 0; j < B; ++j) {
        vec column;
        std::memcpy(&column, col + j * B, sizeof(vec));
        acc += xb[j] * column;
      }
      std::memcpy(y + n * ld + blk * B, &acc, sizeof(vec));
    }
  }
}

// acc[blk][i][:] += a[n, blk, i] * c[n, blk, :] over `rows` rows, acc in T.
template <typename T, int B>
__attribute__((always_inline)) inline void outer_rows_body(const T* __restrict a,
                                                           const T* __restrict c,
                                                           T* __restrict acc_out, int64_t rows,
                                                           int64_t k) {
  typedef T vec __attribute__((vector_size(sizeof(T) * B)));
  const int64_t ld = k * B;
  for (int64_t blk = 0; blk < k; ++blk) {
    vec acc[B];
    _Pragma("GCC unroll 32") for (int i = 0; i < B; ++i) acc[i] = vec{};
    for (int64_t n = 0; n < rows; ++n) {
      const T* ab = a + n * ld + blk * B;
      vec cv;
      std::memcpy(&cv, c + n * ld + blk * B, sizeof(vec));
      _Pragma("GCC unroll 32") for (int i = 0; i < B; ++i) acc[i] += ab[i] * cv;
    }
    _Pragma("GCC unroll 32") for (int i = 0; i < B; ++i) {
      vec sum;
      T* dst = acc_out + (blk * B + i) * B;
      std::memcpy(&sum, dst, sizeof(vec));
      sum += acc[i];
      std::memcpy(dst, &sum, sizeof(vec));
    }
  }
}

// ------------------------------------------------------------------ any block size
template <typename T>
void rotate_rows_any(const T* x, const T* cols, T* y, int64_t rows, int64_t k, int64_t b) {
  const int64_t ld = k * b;
  for (int64_t n = 0; n < rows; ++n) {
    for (int64_t blk = 0; blk < k; ++blk) {
      const T* col = cols + blk * b * b;
      const T* xb = x + n * ld + blk * b;
      T* yb = y + n * ld + blk * b;
      std::fill(yb, yb + b, T(0));
      for (int64_t j = 0; j < b; ++j) {
        for (int64_t i = 0; i < b; ++i) yb[i] += xb[j] * col[j * b + i];
      }
    }
  }
}

template <typename T>
void outer_rows_any(const T* a, const T* c, T* acc, int64_t rows, int64_t k, int64_t b) {
  const int64_t ld = k * b;
  for (int64_t n = 0; n < rows; ++n) {
    for (int64_t blk = 0; blk < k; ++blk) {
      const T* ab = a + n * ld + blk * b;
      const T* cb = c + n * ld + blk * b;
      T* dst = acc + blk * b * b;
      for (int64_t i = 0; i < b; ++i) {
        for (int64_t j = 0; j < b; ++j) dst[i * b + j] += ab[i] * cb[j];
      }
    }
  }
}

// ------------------------------------------------------------------ dispatch
template <typename T>
using RotateFn = void (*)(const T*, const T*, T*, int64_t, int64_t);
template <typename T>
using OuterFn = void (*)(const T*, const T*, T*, int64_t, int64_t);

template <typename T, int B>
void rotate_generic(const T* x, const T* cols, T* y, int64_t rows, int64_t k) {
  rotate_rows_body<T, B>(x, cols, y, rows, k);
}
template <typename T, int B>
void outer_generic(const T* a, const T* c, T* acc, int64_t rows, int64_t k) {
  outer_rows_body<T, B>(a, c, acc, rows, k);
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define PK_BLOCK_ROTATE_AVX2 1
template <typename T, int B>
__attribute__((target("avx2,fma"))) void rotate_avx2(const T* x, const T* cols, T* y,
                                                     int64_t rows, int64_t k) {
  rotate_rows_body<T, B>(x, cols, y, rows, k);
}
template <typename T, int B>
__attribute__((target("avx2,fma"))) void outer_avx2(const T* a, const T* c, T* acc, int64_t rows,
                                                    int64_t k) {
  outer_rows_body<T, B>(a, c, acc, rows, k);
}
using cpu::have_avx2_fma;
#endif

template <typename T, int B>
void pick(RotateFn<T>& rotate, OuterFn<T>& outer) {
  rotate = &rotate_generic<T, B>;
  outer = &outer_generic<T, B>;
#ifdef PK_BLOCK_ROTATE_AVX2
  if (have_avx2_fma()) {
    rotate = &rotate_avx2<T, B>;
    outer = &outer_avx2<T, B>;
  }
#endif
}

// Compile-time kernels for b in {2, 4, 8, 16, 32}; false for other sizes.
template <typename T>
bool pick_fixed(int64_t b, RotateFn<T>& rotate, OuterFn<T>& outer) {
  switch (b) {
    case 2: pick<T, 2>(rotate, outer); return true;
    case 4: pick<T, 4>(rotate, outer); return true;
    case 8: pick<T, 8>(rotate, outer); return true;
    case 16: pick<T, 16>(rotate, outer); return true;
    case 32: pick<T, 32>(rotate, outer); return true;
    default: return false;
  }
}

template <typename T>
void rotate_impl(const BlockRotateParams& p) {
  const int64_t k = p.blocks, b = p.block_size, ld = k * b;
  const T* R = static_cast<const T*>(p.rotations);
  // cols[blk][j][i] = M[i][j] for the applied M: R^T's columns are R's rows (a plain copy).
  std::vector<T> cols(static_cast<size_t>(k * b * b));
  for (int64_t blk = 0; blk < k; ++blk) {
    for (int64_t i = 0; i < b; ++i) {
      for (int64_t j = 0; j < b; ++j) {
        cols[(blk * b + j) * b + i] = p.transpose ? R[(blk * b + j) * b + i] : R[(blk * b + i) * b + j];
      }
    }
  }
  RotateFn<T> rotate = nullptr;
  OuterFn<T> outer = nullptr;
  const bool fixed = pick_fixed<T>(b, rotate, outer);
  const T* x = static_cast<const T*>(p.x);
  T* y = static_cast<T*>(p.y);
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, ld));
  at::parallel_for(0, p.rows, grain, [&](int64_t begin, int64_t end) {
    if (fixed) {
      rotate(x + begin * ld, cols.data(), y + begin * ld, end - begin, k);
    } else {
      rotate_rows_any(x + begin * ld, cols.data(), y + begin * ld, end - begin, k, b);
    }
  });
}

template <typename T>
void outer_impl(const BlockOuterParams& p) {
  const int64_t k = p.blocks, b = p.block_size, ld = k * b, size = k * b * b;
  RotateFn<T> rotate = nullptr;
  OuterFn<T> outer = nullptr;
  const bool fixed = pick_fixed<T>(b, rotate, outer);
  const T* a = static_cast<const T*>(p.a);
  const T* c = static_cast<const T*>(p.c);
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(kOuterChunks, p.rows / kOuterTileRows));
  const int64_t per_chunk = (p.rows + chunks - 1) / chunks;
  std::vector<T> partial(static_cast<size_t>(chunks * size), T(0));
  at::parallel_for(0, chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
    for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
      T* acc = partial.data() + chunk * size;
      const int64_t row_end = std::min(p.rows, (chunk + 1) * per_chunk);
      for (int64_t row = chunk * per_chunk; row < row_end; row += kOuterTileRows) {
        const int64_t rows = std::min(kOuterTileRows, row_end - row);
        if (fixed) {
          outer(a + row * ld, c + row * ld, acc, rows, k);
        } else {
          outer_rows_any(a + row * ld, c + row * ld, acc, rows, k, b);
        }
      }
    }
  });
  T* out = static_cast<T*>(p.out);
  for (int64_t e = 0; e < size; ++e) {
    double sum = 0.0;
    for (int64_t chunk = 0; chunk < chunks; ++chunk) sum += partial[chunk * size + e];
    out[e] = static_cast<T>(sum);
  }
}

}  // namespace

void block_rotate_cpu(const BlockRotateParams& p) {
  switch (p.dtype) {
    case DType::kFloat32: return rotate_impl<float>(p);
    case DType::kFloat64: return rotate_impl<double>(p);
    default: TORCH_CHECK(false, "block_rotate: CPU kernels take float32 or float64");
  }
}

void block_outer_cpu(const BlockOuterParams& p) {
  switch (p.dtype) {
    case DType::kFloat32: return outer_impl<float>(p);
    case DType::kFloat64: return outer_impl<double>(p);
    default: TORCH_CHECK(false, "block_rotate: CPU kernels take float32 or float64");
  }
}

}  // namespace peft_kernels
