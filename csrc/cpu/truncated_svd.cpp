// CPU kernels of the batched truncated SVD (see csrc/kernels/truncated_svd.h).
//
// jacobi: the pairs of each round of the round-robin ordering are disjoint, so they are rotated
// in any order, or in parallel, with the same result: a batch at least as large as the thread
// count runs one matrix per thread, a smaller one parallelises each round's pairs. Either way a
// matrix's result does not depend on the batch it came in or on the thread count. The pair's three
// dot products come from one pass over both columns; columns are contiguous, vectorised through
// GCC vector extensions with an AVX2 + FMA clone chosen at run time.
#include "kernels/truncated_svd.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "cpu/cpu_features.h"
#include "cpu/simd.h"

namespace peft_kernels {
namespace {

using cpu::kLanes;
using cpu::load;
using cpu::load_part;
using cpu::store;
using cpu::store_part;
using cpu::Vec;

// |x|^2, |y|^2 and x . y over n elements, two vectors per step so each sum has two chains.
template <typename T, int B = 32>
PK_SIMD_INLINE void dots3(const T* __restrict x, const T* __restrict y, int64_t n, T& xx, T& yy,
                          T& xy) {
  constexpr int L = kLanes<T, B>;
  Vec<T, B> sxx0 = {}, syy0 = {}, sxy0 = {}, sxx1 = {}, syy1 = {}, sxy1 = {};
  int64_t i = 0;
  for (; i + 2 * L <= n; i += 2 * L) {
    const Vec<T, B> x0 = load<T, B>(x + i), y0 = load<T, B>(y + i);
    const Vec<T, B> x1 = load<T, B>(x + i + L), y1 = load<T, B>(y + i + L);
    sxx0 += x0 * x0;
    syy0 += y0 * y0;
    sxy0 += x0 * y0;
    sxx1 += x1 * x1;
    syy1 += y1 * y1;
    sxy1 += x1 * y1;
  }
  for (; i < n; i += L) {
    const int64_t w = std::min<int64_t>(L, n - i);
    const Vec<T, B> x0 = w == L ? load<T, B>(x + i) : load_part<T, B>(x + i, w);
    const Vec<T, B> y0 = w == L ? load<T, B>(y + i) : load_part<T, B>(y + i, w);
    sxx0 += x0 * x0;
    syy0 += y0 * y0;
    sxy0 += x0 * y0;
  }
  xx = cpu::lane_sum<T, B>(sxx0 + sxx1);
  yy = cpu::lane_sum<T, B>(syy0 + syy1);
  xy = cpu::lane_sum<T, B>(sxy0 + sxy1);
}

// x <- c x - s y, y <- s x + c y over n elements.
template <typename T, int B = 32>
PK_SIMD_INLINE void rotate(T* __restrict x, T* __restrict y, int64_t n, T c, T s) {
  constexpr int L = kLanes<T, B>;
  int64_t i = 0;
  for (; i + L <= n; i += L) {
    const Vec<T, B> xv = load<T, B>(x + i), yv = load<T, B>(y + i);
    store<T, B>(x + i, c * xv - s * yv);
    store<T, B>(y + i, s * xv + c * yv);
  }
  if (i < n) {
    const int64_t w = n - i;
    const Vec<T, B> xv = load_part<T, B>(x + i, w), yv = load_part<T, B>(y + i, w);
    store_part<T, B>(x + i, c * xv - s * yv, w);
    store_part<T, B>(y + i, s * xv + c * yv, w);
  }
}

// x . y over n elements.
template <typename T, int B = 32>
PK_SIMD_INLINE T dot(const T* __restrict x, const T* __restrict y, int64_t n) {
  constexpr int L = kLanes<T, B>;
  Vec<T, B> s0 = {}, s1 = {};
  int64_t i = 0;
  for (; i + 2 * L <= n; i += 2 * L) {
    s0 += load<T, B>(x + i) * load<T, B>(y + i);
    s1 += load<T, B>(x + i + L) * load<T, B>(y + i + L);
  }
  for (; i < n; i += L) {
    const int64_t w = std::min<int64_t>(L, n - i);
    const Vec<T, B> xv = w == L ? load<T, B>(x + i) : load_part<T, B>(x + i, w);
    const Vec<T, B> yv = w == L ? load<T, B>(y + i) : load_part<T, B>(y + i, w);
    s0 += xv * yv;
  }
  return cpu::lane_sum<T, B>(s0 + s1);
}

// y <- y - a x over n elements.
template <typename T, int B = 32>
PK_SIMD_INLINE void axpy_neg(T a, const T* __restrict x, T* __restrict y, int64_t n) {
  constexpr int L = kLanes<T, B>;
  int64_t i = 0;
  for (; i + L <= n; i += L) store<T, B>(y + i, load<T, B>(y + i) - a * load<T, B>(x + i));
  for (; i < n; ++i) y[i] -= a * x[i];
}

template <typename T>
struct JacobiMatrix {
  T* x;  // [n, m]
  T* v;  // [n, n]
  int64_t m, n;
  T tol;
  double negligible;  // squared norm at or below which a column is zero (svd::negligible)
};

// Pairs of a round handled together: first their dot products, then their rotations (a chain of
// divisions and square roots per pair, ~60 cycles of latency; independent across the pairs, so
// the chains overlap), then the column updates. Computed one pair at a time the chain was on the
// critical path of every pair: ~150 cycles per pair at m = 64.
constexpr int64_t kPairBatch = 16;

// Rotates the pairs [pair_begin, pair_end) of one round; true if any pair rotated.
template <typename T, int B = 32>
PK_SIMD_INLINE bool rotate_pairs(const JacobiMatrix<T>& a, int64_t round, int64_t pair_begin,
                                 int64_t pair_end) {
  const int64_t n_even = a.n + (a.n & 1);
  bool rotated = false;
  for (int64_t first = pair_begin; first < pair_end; first += kPairBatch) {
    const int64_t last = std::min(first + kPairBatch, pair_end);
    int64_t ps[kPairBatch], qs[kPairBatch];
    T alpha[kPairBatch], beta[kPairBatch], gamma[kPairBatch], c[kPairBatch], s[kPairBatch];
    bool go[kPairBatch];
    int live = 0;
    for (int64_t i = first; i < last; ++i) {
      const int64_t i0 = svd::round_robin_index(i, round, n_even);
      const int64_t i1 = svd::round_robin_index(n_even - 1 - i, round, n_even);
      const int64_t p = std::min(i0, i1), q = std::max(i0, i1);
      if (q >= a.n) continue;  // the odd-n padding index sits this round out
      ps[live] = p;
      qs[live] = q;
      dots3<T, B>(a.x + p * a.m, a.x + q * a.m, a.m, alpha[live], beta[live], gamma[live]);
      ++live;
    }
    for (int j = 0; j < live; ++j) {
      const bool zero_p = svd::negligible(alpha[j], a.negligible);
      const bool zero_q = svd::negligible(beta[j], a.negligible);
      if (zero_p) std::fill(a.x + ps[j] * a.m, a.x + (ps[j] + 1) * a.m, T(0));
      if (zero_q) std::fill(a.x + qs[j] * a.m, a.x + (qs[j] + 1) * a.m, T(0));
      // Formed for every pair (a pair left alone may give inf or NaN here, never used).
      go[j] = !zero_p && !zero_q && svd::needs_rotation(alpha[j], beta[j], gamma[j], a.tol);
      const svd::Rotation<T> r = svd::jacobi_rotation(alpha[j], beta[j], gamma[j]);
      c[j] = r.c;
      s[j] = r.s;
    }
    for (int j = 0; j < live; ++j) {
      if (!go[j]) continue;
      rotate<T, B>(a.x + ps[j] * a.m, a.x + qs[j] * a.m, a.m, c[j], s[j]);
      rotate<T, B>(a.v + ps[j] * a.n, a.v + qs[j] * a.n, a.n, c[j], s[j]);
      rotated = true;
    }
  }
  return rotated;
}

template <typename T>
bool rotate_pairs_generic(const JacobiMatrix<T>& a, int64_t round, int64_t b, int64_t e) {
  return rotate_pairs(a, round, b, e);
}
#ifdef PK_X86_AVX2
template <typename T>
__attribute__((target("avx2,fma"))) bool rotate_pairs_avx2(const JacobiMatrix<T>& a,
                                                          int64_t round, int64_t b, int64_t e) {
  return rotate_pairs(a, round, b, e);
}
// 64-byte vectors: half the loads and stores per column pass, which bound the rotations.
template <typename T>
__attribute__((target("avx512f,avx2,fma"))) bool rotate_pairs_avx512(const JacobiMatrix<T>& a,
                                                           int64_t round, int64_t b, int64_t e) {
  return rotate_pairs<T, 64>(a, round, b, e);
}
#endif

template <typename T>
using RotatePairs = bool (*)(const JacobiMatrix<T>&, int64_t, int64_t, int64_t);

template <typename T>
RotatePairs<T> pick_rotate_pairs() {
#ifdef PK_X86_AVX2
  if (cpu::have_avx512()) return &rotate_pairs_avx512<T>;
  if (cpu::have_avx2_fma()) return &rotate_pairs_avx2<T>;
#endif
  return &rotate_pairs_generic<T>;
}

// V = I; NaN everywhere and false if the matrix holds a non-finite value.
template <typename T>
bool prepare(const JacobiMatrix<T>& a) {
  bool finite = true;
  for (int64_t i = 0; i < a.n * a.m && finite; ++i) finite = std::isfinite(a.x[i]);
  if (!finite) {
    std::fill(a.x, a.x + a.n * a.m, std::numeric_limits<T>::quiet_NaN());
    std::fill(a.v, a.v + a.n * a.n, std::numeric_limits<T>::quiet_NaN());
    return false;
  }
  std::fill(a.v, a.v + a.n * a.n, T(0));
  for (int64_t j = 0; j < a.n; ++j) a.v[j * a.n + j] = T(1);
  return true;
}

// Sweeps one matrix; `round` runs one round's pairs (serially or split over threads).
template <typename T, typename RunRound>
int32_t sweep_matrix(const JacobiMatrix<T>& a, int max_sweeps, const RunRound& run_round) {
  if (!prepare(a)) return svd::kNonFinite;
  const int64_t n_even = a.n + (a.n & 1);
  for (int sweep = 1; sweep <= max_sweeps; ++sweep) {
    bool rotated = false;
    for (int64_t round = 0; round < n_even - 1; ++round) rotated |= run_round(round);
    if (!rotated) return sweep;
  }
  return svd::kNotConverged;
}

template <typename T>
void jacobi_impl(const JacobiSvdParams& p) {
  const RotatePairs<T> rotate_fn = pick_rotate_pairs<T>();
  const int64_t n_even = p.n + (p.n & 1), pairs = n_even / 2;
  auto matrix = [&](int64_t b) {
    return JacobiMatrix<T>{static_cast<T*>(p.x) + b * p.n * p.m,
                           static_cast<T*>(p.v) + b * p.n * p.n, p.m, p.n,
                           static_cast<T>(p.tol), p.negligible ? p.negligible[b] : -1.0};
  };
  if (p.batch >= at::get_num_threads()) {
    at::parallel_for(0, p.batch, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const JacobiMatrix<T> a = matrix(b);
        p.sweeps[b] = sweep_matrix(a, p.max_sweeps, [&](int64_t round) {
          return rotate_fn(a, round, 0, pairs);
        });
      }
    });
    return;
  }
  // Few matrices: a round's pairs in parallel, when a round has enough work to pay for it.
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(p.m + p.n, 1));
  for (int64_t b = 0; b < p.batch; ++b) {
    const JacobiMatrix<T> a = matrix(b);
    p.sweeps[b] = sweep_matrix(a, p.max_sweeps, [&](int64_t round) {
      std::vector<char> rotated(static_cast<size_t>(pairs), 0);
      at::parallel_for(0, pairs, grain, [&](int64_t i0, int64_t i1) {
        rotated[i0] = rotate_fn(a, round, i0, i1);
      });
      return std::any_of(rotated.begin(), rotated.end(), [](char r) { return r != 0; });
    });
  }
}

// c[i] = q_i . v for the 4 vectors q_0.. q_3 (rows of q with stride m), one pass over v.
template <typename T, int B = 32>
PK_SIMD_INLINE void dot4(const T* __restrict q, int64_t m, const T* __restrict v, T* c) {
  constexpr int L = kLanes<T, B>;
  Vec<T, B> s0 = {}, s1 = {}, s2 = {}, s3 = {};
  int64_t t = 0;
  for (; t + L <= m; t += L) {
    const Vec<T, B> x = load<T, B>(v + t);
    s0 += load<T, B>(q + t) * x;
    s1 += load<T, B>(q + m + t) * x;
    s2 += load<T, B>(q + 2 * m + t) * x;
    s3 += load<T, B>(q + 3 * m + t) * x;
  }
  c[0] = cpu::lane_sum<T, B>(s0);
  c[1] = cpu::lane_sum<T, B>(s1);
  c[2] = cpu::lane_sum<T, B>(s2);
  c[3] = cpu::lane_sum<T, B>(s3);
  for (; t < m; ++t) {
    c[0] += q[t] * v[t];
    c[1] += q[m + t] * v[t];
    c[2] += q[2 * m + t] * v[t];
    c[3] += q[3 * m + t] * v[t];
  }
}

// v -= sum_i c[i] q_i over the 4 vectors q_0.. q_3, one pass over v.
template <typename T, int B = 32>
PK_SIMD_INLINE void subtract4(const T* __restrict q, int64_t m, const T* c, T* __restrict v) {
  constexpr int L = kLanes<T, B>;
  int64_t t = 0;
  for (; t + L <= m; t += L) {
    store<T, B>(v + t, load<T, B>(v + t) - c[0] * load<T, B>(q + t) -
                           c[1] * load<T, B>(q + m + t) - c[2] * load<T, B>(q + 2 * m + t) -
                           c[3] * load<T, B>(q + 3 * m + t));
  }
  for (; t < m; ++t) v[t] -= c[0] * q[t] + c[1] * q[m + t] + c[2] * q[2 * m + t] + c[3] * q[3 * m + t];
}

// v minus its projection on q_0..q_{j-1}: classical Gram-Schmidt (all coefficients from the
// same v, so four vectors share each pass over v), run twice ("twice is enough": Giraud,
// Langou, Rozloznik and van den Eshof 2005).
template <typename T, int B = 32>
PK_SIMD_INLINE void project_out(const T* q, int64_t m, int64_t j, T* v, T* c) {
  for (int pass = 0; pass < 2; ++pass) {
    int64_t i = 0;
    for (; i + 4 <= j; i += 4) dot4<T, B>(q + i * m, m, v, c + i);
    for (; i < j; ++i) c[i] = dot<T, B>(q + i * m, v, m);
    i = 0;
    for (; i + 4 <= j; i += 4) subtract4<T, B>(q + i * m, m, c + i, v);
    for (; i < j; ++i) axpy_neg<T, B>(c[i], q + i * m, v, m);
  }
}

// The l vectors of one matrix, in order; a dependent vector is replaced.
template <typename T, int B = 32>
PK_SIMD_INLINE void orthonormalize_matrix(T* q, int64_t m, int64_t l, T threshold,
                                          std::vector<T>& represented, std::vector<T>& coeffs) {
  for (int64_t j = 0; j < l; ++j) {
    T* qj = q + j * m;
    const T norm0 = std::sqrt(dot<T, B>(qj, qj, m));
    project_out<T, B>(q, m, j, qj, coeffs.data());
    T norm = std::sqrt(dot<T, B>(qj, qj, m));
    if (!(norm > threshold * norm0) && !std::isnan(norm)) {
      // e_t for the t least represented in q_0..q_{j-1}: its residual is at least (m - j) / m.
      std::fill(represented.begin(), represented.end(), T(0));
      for (int64_t i = 0; i < j; ++i) {
        for (int64_t t = 0; t < m; ++t) represented[t] += q[i * m + t] * q[i * m + t];
      }
      const int64_t t = std::min_element(represented.begin(), represented.end()) -
                        represented.begin();
      std::fill(qj, qj + m, T(0));
      qj[t] = T(1);
      project_out<T, B>(q, m, j, qj, coeffs.data());
      norm = std::sqrt(dot<T, B>(qj, qj, m));
    }
    const T inv = T(1) / norm;
    for (int64_t t = 0; t < m; ++t) qj[t] *= inv;
  }
}

template <typename T, int B = 32>
PK_SIMD_INLINE void orthonormalize_rows_body(const OrthonormalizeParams& p, int64_t b0,
                                             int64_t b1) {
  std::vector<T> represented(static_cast<size_t>(p.m)), coeffs(static_cast<size_t>(p.l));
  const T threshold = static_cast<T>(svd::dependence_threshold(sizeof(T) == 8));
  for (int64_t b = b0; b < b1; ++b) {
    orthonormalize_matrix<T, B>(static_cast<T*>(p.q) + b * p.l * p.m, p.m, p.l, threshold,
                                represented, coeffs);
  }
}
template <typename T>
void orthonormalize_rows(const OrthonormalizeParams& p, int64_t b0, int64_t b1) {
  orthonormalize_rows_body<T>(p, b0, b1);
}
#ifdef PK_X86_AVX2
template <typename T>
__attribute__((target("avx2,fma"))) void orthonormalize_rows_avx2(const OrthonormalizeParams& p,
                                                                 int64_t b0, int64_t b1) {
  orthonormalize_rows_body<T>(p, b0, b1);
}
template <typename T>
__attribute__((target("avx512f,avx2,fma"))) void orthonormalize_rows_avx512(
    const OrthonormalizeParams& p, int64_t b0, int64_t b1) {
  orthonormalize_rows_body<T, 64>(p, b0, b1);
}
#endif

template <typename T>
void orthonormalize_impl(const OrthonormalizeParams& p) {
  auto run = &orthonormalize_rows<T>;
#ifdef PK_X86_AVX2
  if (cpu::have_avx512()) {
    run = &orthonormalize_rows_avx512<T>;
  } else if (cpu::have_avx2_fma()) {
    run = &orthonormalize_rows_avx2<T>;
  }
#endif
  at::parallel_for(0, p.batch, 1, [&](int64_t b0, int64_t b1) { run(p, b0, b1); });
}

}  // namespace

void jacobi_svd_cpu(const JacobiSvdParams& p) {
  if (p.batch <= 0 || p.n <= 0) return;
  switch (p.dtype) {
    case DType::kFloat32: return jacobi_impl<float>(p);
    case DType::kFloat64: return jacobi_impl<double>(p);
    default: TORCH_CHECK(false, "truncated_svd: the CPU kernels support float32 and float64");
  }
}

void orthonormalize_cpu(const OrthonormalizeParams& p) {
  if (p.batch <= 0 || p.l <= 0) return;
  switch (p.dtype) {
    case DType::kFloat32: return orthonormalize_impl<float>(p);
    case DType::kFloat64: return orthonormalize_impl<double>(p);
    default: TORCH_CHECK(false, "truncated_svd: the CPU kernels support float32 and float64");
  }
}

}  // namespace peft_kernels
