// CPU kernel of the batched matrix exponential (see csrc/kernels/expm.h): one matrix per thread,
// its whole evaluation in a private workspace that stays in cache, so each matrix gets its own
// degree and squarings at no synchronisation cost. The products are i-k-j loops whose inner
// sweep the compiler vectorises (AVX2+FMA clone when the CPU has it).
#include "kernels/expm.h"
#include "cpu/cpu_features.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

namespace peft_kernels {
namespace {

template <typename T, typename Dim>
__attribute__((always_inline)) inline void gemm_body(Dim n, T* __restrict Z, const T* __restrict X,
                                                     const T* __restrict Y, bool accumulate) {
  for (int64_t i = 0; i < n; ++i) {
    T* __restrict z = Z + i * n;
    if (!accumulate) std::fill(z, z + n, T(0));
    for (int64_t k = 0; k < n; ++k) {
      const T a = X[i * n + k];
      const T* __restrict y = Y + k * n;
      for (int64_t j = 0; j < n; ++j) z[j] += a * y[j];
    }
  }
}

template <typename T, typename Dim>
void gemm_generic(Dim n, T* Z, const T* X, const T* Y, bool accumulate) {
  gemm_body(n, Z, X, Y, accumulate);
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define PK_EXPM_AVX2 1
template <typename T, typename Dim>
__attribute__((target("avx2,fma"))) void gemm_avx2(Dim n, T* Z, const T* X, const T* Y,
                                                   bool accumulate) {
  gemm_body(n, Z, X, Y, accumulate);
}

// Register-blocked product for a compile-time N that is a multiple of the AVX width: RB rows x CV
// vectors of Z accumulate in registers (<= 8 accumulators + CV row vectors of Y), 2-9x faster than
// the loops above for N = 8..64 (measured 15.7 ns for 8 x 8 float against 139 ns).
template <typename T, int64_t N>
__attribute__((target("avx2,fma"))) void gemm_avx2_fixed(std::integral_constant<int64_t, N>,
                                                         T* __restrict Z, const T* __restrict X,
                                                         const T* __restrict Y, bool accumulate) {
  typedef T vec __attribute__((vector_size(32)));
  constexpr int64_t W = 32 / sizeof(T), V = N / W;
  constexpr int64_t CV = V < 4 ? V : 4, RB = 8 / CV;
  static_assert(N % W == 0 && V % CV == 0 && N % RB == 0, "N must be a multiple of the rows block");
  for (int64_t c = 0; c < V; c += CV) {
    for (int64_t i = 0; i < N; i += RB) {
      vec acc[RB][CV];
      _Pragma("GCC unroll 8") for (int64_t r = 0; r < RB; ++r) {
        _Pragma("GCC unroll 8") for (int64_t v = 0; v < CV; ++v) {
          if (accumulate) {
            std::memcpy(&acc[r][v], Z + (i + r) * N + (c + v) * W, sizeof(vec));
          } else {
            acc[r][v] = vec{};
          }
        }
      }
      for (int64_t k = 0; k < N; ++k) {
        vec y[CV];
        _Pragma("GCC unroll 8") for (int64_t v = 0; v < CV; ++v) {
          std::memcpy(&y[v], Y + k * N + (c + v) * W, sizeof(vec));
        }
        _Pragma("GCC unroll 8") for (int64_t r = 0; r < RB; ++r) {
          const T a = X[(i + r) * N + k];
          _Pragma("GCC unroll 8") for (int64_t v = 0; v < CV; ++v) acc[r][v] += a * y[v];
        }
      }
      _Pragma("GCC unroll 8") for (int64_t r = 0; r < RB; ++r) {
        _Pragma("GCC unroll 8") for (int64_t v = 0; v < CV; ++v) {
          std::memcpy(Z + (i + r) * N + (c + v) * W, &acc[r][v], sizeof(vec));
        }
      }
    }
  }
}

using cpu::have_avx2_fma;
#endif

template <typename T, typename Dim>
struct Gemm {
  static void (*pick())(Dim, T*, const T*, const T*, bool) {
#ifdef PK_EXPM_AVX2
    if (have_avx2_fma()) return &gemm_avx2<T, Dim>;
#endif
    return &gemm_generic<T, Dim>;
  }
};

template <typename T, int64_t N>
struct Gemm<T, std::integral_constant<int64_t, N>> {
  using Dim = std::integral_constant<int64_t, N>;
  static void (*pick())(Dim, T*, const T*, const T*, bool) {
#ifdef PK_EXPM_AVX2
    if (have_avx2_fma()) return &gemm_avx2_fixed<T, N>;
#endif
    return &gemm_generic<T, Dim>;
  }
};

template <typename T, typename Dim>
struct CpuBackend {
  Dim n;
  void (*gemm_fn)(Dim, T*, const T*, const T*, bool);

  int64_t first() const { return 0; }
  int64_t stride() const { return 1; }
  void sync() const {}
  void gemm(T* Z, const T* X, const T* Y, bool accumulate) const {
    gemm_fn(n, Z, X, Y, accumulate);
  }
  double norm1(const T* X) const { return expm::norm1_serial(X, static_cast<int64_t>(n)); }
};

template <typename T, typename Dim>
void run(const ExpmParams& p, Dim n) {
  const int64_t nn = static_cast<int64_t>(n) * n;
  const T* a = static_cast<const T*>(p.a);
  const T* direction = static_cast<const T*>(p.direction);
  T* out = static_cast<T*>(p.out);
  const CpuBackend<T, Dim> be{n, Gemm<T, Dim>::pick()};
  // One matrix is ~30 n^3 flops: batch items per task so each task has >= ~1e5 flops of work.
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, nn * n / 8));
  at::parallel_for(0, p.batch, grain, [&](int64_t begin, int64_t end) {
    std::vector<T> workspace(static_cast<size_t>((direction ? 2 : 1) * expm::kSlots * nn));
    T* ws = workspace.data();
    for (int64_t b = begin; b < end; ++b) {
      const T* A = a + b * nn;
      if (direction == nullptr) {
        std::copy(A, A + nn, ws);
        const int slot = expm::exp_in_workspace<false, T>(be, n, ws);
        std::copy(ws + slot * nn, ws + (slot + 1) * nn, out + b * nn);
      } else {
        // gradient = L(A^T, G)
        for (int64_t i = 0; i < n; ++i)
          for (int64_t j = 0; j < n; ++j) ws[i * n + j] = A[j * n + i];
        std::copy(direction + b * nn, direction + (b + 1) * nn, ws + expm::kSlots * nn);
        const int slot = expm::exp_in_workspace<true, T>(be, n, ws);
        const T* L = ws + (expm::kSlots + slot) * nn;
        std::copy(L, L + nn, out + b * nn);
      }
    }
  });
}

template <int64_t N>
using Fixed = std::integral_constant<int64_t, N>;

// The usual block sizes of orthogonal adapters get a compile-time size: register-blocked
// products and unrolled elementwise sweeps. (Sizes below the AVX width take the generic loops.)
template <typename T>
void run_any(const ExpmParams& p) {
  switch (p.n) {
    case 8: return run<T>(p, Fixed<8>{});
    case 16: return run<T>(p, Fixed<16>{});
    case 32: return run<T>(p, Fixed<32>{});
    case 64: return run<T>(p, Fixed<64>{});
    default: return run<T>(p, p.n);
  }
}

}  // namespace

void expm_cpu(const ExpmParams& p) {
  switch (p.dtype) {
    case DType::kFloat32: return run_any<float>(p);
    case DType::kFloat64: return run_any<double>(p);
    default: TORCH_CHECK(false, "expm: CPU kernels take float32 or float64");
  }
}

}  // namespace peft_kernels
