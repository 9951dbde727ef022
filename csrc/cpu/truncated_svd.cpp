// CPU kernels of the batched truncated SVD (see csrc/kernels/truncated_svd.h).
//
// jacobi: the pairs of each round of the round-robin ordering are disjoint, so they are rotated
// in any order, or in parallel, with the same result: a batch at least as large as the thread
// count runs one matrix per thread, a smaller one parallelises each round's pairs. Either way a
// matrix's result does not depend on the batch it came in or on the thread count. A pair costs
// one dot product (the columns' squared norms are kept, see kRenormalize); columns are
// contiguous, vectorised through GCC vector extensions with AVX2 + FMA and AVX-512 clones chosen
// at run time.
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
  T* x;      // [n, m]
  T* v;      // [n, n]
  T* norms;  // [n] the columns' squared norms, formed at each sweep's start and then updated
  int64_t m, n;
  T tol;
  double negligible;  // squared norm at or below which a column is zero (svd::negligible)
};

// Pairs of a round handled together: first their dot products, then their rotations (a chain of
// divisions and square roots per pair, ~60 cycles of latency; independent across the pairs, so
// the chains overlap and vectorise), then the column updates.
constexpr int64_t kPairBatch = 16;

// A rotation changes the squared norms by -t gamma and +t gamma exactly (Rutishauser), so only
// gamma = x_p . x_q needs a pass over the columns: one dot product and one horizontal sum per pair
// instead of three (the sums were half of the time at 64 x 64). The updated norm of a column that
// shrank below kRenormalize of its norm before the rotation has lost relative accuracy in the
// subtraction, so it is formed again from the column (as LAPACK's xGESVJ does, there at sqrt(eps)),
// and every sweep starts from norms formed afresh. Only the rotation angles and the threshold of
// the orthogonality test use these norms; gamma, which decides convergence, is always exact, and
// so are the singular values (the final columns' norms).
constexpr double kRenormalize = 1.0 / 16;

// Slots i of a round's pairs, as indices: svd::round_robin_index without its two divisions per
// pair: 5-10% of a 64 x 64 float32 sweep (8 matrices: 1.27 ms with them, 1.15-1.21 without).
struct RoundIndices {
  int64_t n_even, low, high;  // low = (i - 1 + round) mod (n_even - 1), high: for n_even - 1 - i
  RoundIndices(int64_t round, int64_t n_even, int64_t first) : n_even(n_even) {
    const int64_t cycle = n_even - 1;
    low = ((first - 1 + round) % cycle + cycle) % cycle;
    high = (n_even - 2 - first + round) % cycle;
  }
  // Indices of the pair at the current slot, then moves on to the next.
  void next(int64_t i, int64_t& p, int64_t& q) {
    const int64_t i0 = i == 0 ? 0 : 1 + low, i1 = 1 + high;
    p = std::min(i0, i1);
    q = std::max(i0, i1);
    low = low + 1 == n_even - 1 ? 0 : low + 1;
    high = high == 0 ? n_even - 2 : high - 1;
  }
};

// Column j set to zero (a negligible column, see svd::negligible).
template <typename T>
void zero_column(const JacobiMatrix<T>& a, int64_t j) {
  std::fill(a.x + j * a.m, a.x + (j + 1) * a.m, T(0));
  a.norms[j] = T(0);
}

// Column j's squared norm after a rotation took it from `before` to `updated` (see kRenormalize).
template <typename T, int B = 32>
PK_SIMD_INLINE T updated_norm(const JacobiMatrix<T>& a, int64_t j, T before, T updated) {
  if (updated > static_cast<T>(kRenormalize) * before) return updated;
  const T* col = a.x + j * a.m;
  return dot<T, B>(col, col, a.m);
}

// svd::jacobi_tangent. Short of AVX-512's masked selects (B < 64), float's is formed in double,
// where zeta^2 cannot overflow, so without the selects that keep GCC from vectorising the
// batch's loop there (zeta + 0 turns a zeta of -0 into +0, whose sign the header's test
// zeta >= 0 takes as positive). With AVX-512 the float form measured ~8% faster.
template <typename T, int B>
PK_SIMD_INLINE T tangent(T alpha, T beta, T gamma) {
  if constexpr (B < 64 && sizeof(T) == 4) {
    const double zeta = (static_cast<double>(beta) - alpha) / (2.0 * gamma);
    const double root = std::sqrt(1.0 + zeta * zeta);
    return static_cast<T>(std::copysign(1.0, zeta + 0.0) / (std::fabs(zeta) + root));
  } else {
    return svd::jacobi_tangent(alpha, beta, gamma);
  }
}

// Rotates the pairs [pair_begin, pair_end) of one round; true if any pair rotated.
template <typename T, int B = 32>
PK_SIMD_INLINE bool rotate_pairs(const JacobiMatrix<T>& a, int64_t round, int64_t pair_begin,
                                 int64_t pair_end) {
  const int64_t n_even = a.n + (a.n & 1);
  bool rotated = false;
  RoundIndices slots(round, n_even, pair_begin);
  for (int64_t first = pair_begin; first < pair_end; first += kPairBatch) {
    const int64_t last = std::min(first + kPairBatch, pair_end);
    int64_t ps[kPairBatch], qs[kPairBatch];
    T alpha[kPairBatch], beta[kPairBatch], gamma[kPairBatch], c[kPairBatch], t[kPairBatch];
    bool go[kPairBatch], zero_p[kPairBatch], zero_q[kPairBatch];
    int live = 0;
    for (int64_t i = first; i < last; ++i) {
      int64_t p, q;
      slots.next(i, p, q);
      const T* xp = a.x + p * a.m;
      if (q >= a.n) {  // the odd-n padding index sits this round out
        if (round == 0) a.norms[p] = dot<T, B>(xp, xp, a.m);
        continue;
      }
      ps[live] = p;
      qs[live] = q;
      const T* xq = a.x + q * a.m;
      // Round 0 pairs every column once: the sweep's fresh norms come with its gammas.
      if (round == 0) {
        dots3<T, B>(xp, xq, a.m, alpha[live], beta[live], gamma[live]);
        a.norms[p] = alpha[live];
        a.norms[q] = beta[live];
      } else {
        alpha[live] = a.norms[p];
        beta[live] = a.norms[q];
        gamma[live] = dot<T, B>(xp, xq, a.m);
      }
      ++live;
    }
    // The rotations, in vectors where GCC vectorises this loop (AVX-512's 64-byte clones, and
    // float: see tangent) over the whole batch, unused slots included; otherwise over the live
    // pairs. A pair left alone, or an unused slot, may give inf or NaN here, never used. One
    // pair at a time, the divisions and square roots took a third of the sweep.
    const int slots = B == 64 || sizeof(T) == 4 ? static_cast<int>(kPairBatch) : live;
    for (int j = live; j < slots; ++j) alpha[j] = beta[j] = gamma[j] = T(1);
    for (int j = 0; j < slots; ++j) {
      t[j] = tangent<T, B>(alpha[j], beta[j], gamma[j]);
      c[j] = T(1) / std::sqrt(T(1) + t[j] * t[j]);
    }
    bool any_zero = false;
    for (int j = 0; j < live; ++j) {
      zero_p[j] = svd::negligible(alpha[j], a.negligible);
      zero_q[j] = svd::negligible(beta[j], a.negligible);
      any_zero |= zero_p[j] | zero_q[j];
      go[j] = !zero_p[j] & !zero_q[j] & svd::needs_rotation(alpha[j], beta[j], gamma[j], a.tol);
    }
    for (int j = 0; j < live && any_zero; ++j) {
      if (zero_p[j]) zero_column(a, ps[j]);
      if (zero_q[j]) zero_column(a, qs[j]);
    }
    for (int j = 0; j < live; ++j) {
      if (!go[j]) continue;
      const int64_t p = ps[j], q = qs[j];
      const T s = c[j] * t[j];
      rotate<T, B>(a.x + p * a.m, a.x + q * a.m, a.m, c[j], s);
      rotate<T, B>(a.v + p * a.n, a.v + q * a.n, a.n, c[j], s);
      const T shift = t[j] * gamma[j];
      a.norms[p] = updated_norm<T, B>(a, p, alpha[j], alpha[j] - shift);
      a.norms[q] = updated_norm<T, B>(a, q, beta[j], beta[j] + shift);
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
  auto matrix = [&](int64_t b, std::vector<T>& norms) {
    return JacobiMatrix<T>{static_cast<T*>(p.x) + b * p.n * p.m,
                           static_cast<T*>(p.v) + b * p.n * p.n, norms.data(), p.m, p.n,
                           static_cast<T>(p.tol), p.negligible ? p.negligible[b] : -1.0};
  };
  if (p.batch >= at::get_num_threads()) {
    at::parallel_for(0, p.batch, 1, [&](int64_t b0, int64_t b1) {
      std::vector<T> thread_norms(static_cast<size_t>(p.n));
      for (int64_t b = b0; b < b1; ++b) {
        const JacobiMatrix<T> a = matrix(b, thread_norms);
        p.sweeps[b] = sweep_matrix(a, p.max_sweeps, [&](int64_t round) {
          return rotate_fn(a, round, 0, pairs);
        });
      }
    });
    return;
  }
  // Few matrices: a round's pairs in parallel, when a round has enough work to pay for it.
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(p.m + p.n, 1));
  std::vector<T> norms(static_cast<size_t>(p.n));
  for (int64_t b = 0; b < p.batch; ++b) {
    const JacobiMatrix<T> a = matrix(b, norms);
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
