// Batched matrix exponential: scaling and squaring of the Taylor approximants of Bader, Blanes and
// Casas, "Computing the matrix exponential with an optimized Taylor polynomial approximation"
// (Mathematics 7(12), 2019), with the degree m in {1, 2, 4, 8, 12, 18} and the number of squarings
// s chosen per matrix from that matrix's own 1-norm and, for the high degrees, from
// max(||A^2||^(1/2), ||A^3||^(1/3)). The Frechet derivative L(A, E) comes from
// differentiating the same evaluation (each product Z = XY also forms LZ = LX Y + X LY, the
// squarings likewise), as Al-Mohy and Higham (SIMAX 30(4), 2009) do for Pade: about 3x the products
// of the forward, against the 2n x 2n block exponential (8x) that autograd of matrix_exp costs.
// The gradient of exp at A for an output gradient G is L(A^T, G) (real matrices).
//
// The algorithm is written once, over a backend that supplies n x n products, a 1-norm and a
// barrier: the CPU kernel (one matrix per thread) and the CUDA kernel (one thread block per
// matrix, workspace in shared or global memory) instantiate it. The Taylor schemes (taylor below)
// are also shared with the batched-GEMM evaluation that both devices take for n >= 128
// (expm_batched, csrc/ops/expm.cpp).
// No torch headers: nvcc compiles this on machines without a CUDA torch.
#pragma once
#include <math.h>

#include <cstdint>

#include "kernels/common.h"

namespace peft_kernels {

struct ExpmParams {
  DType dtype = DType::kFloat32;  // of a, direction and out
  int64_t batch = 0;
  int64_t n = 0;
  const void* a = nullptr;          // [batch, n, n] contiguous
  const void* direction = nullptr;  // [batch, n, n] contiguous; null: forward (out = exp(A))
  void* out = nullptr;              // [batch, n, n] contiguous
  void* workspace = nullptr;        // CUDA: expm_cuda_workspace_bytes(p) bytes of device memory
  // With a direction: out = L(A^T, direction), the gradient of exp at A for the output gradient
  // `direction`.
};

// CPU: float32 / float64, one matrix per thread (ops/expm.cpp takes n >= 128 through batched
// GEMMs instead).
void expm_cpu(const ExpmParams& p);
// CUDA: float32 / float64 / float16 / bfloat16 (half types computed in float32).
void expm_cuda(const ExpmParams& p, cudaStream_t stream);
// Global-memory workspace expm_cuda needs for p (0 when each matrix fits in shared memory).
int64_t expm_cuda_workspace_bytes(const ExpmParams& p);

namespace expm {

// n x n matrices the evaluation keeps; the derivative doubles it (slots kSlots..2 kSlots-1 hold
// the derivatives of slots 0..kSlots-1).
constexpr int kSlots = 7;
// The slots: A and its powers, then three partial sums.
enum Slot : int { A = 0, A2 = 1, A3 = 2, A6 = 3, S1 = 4, S2 = 5, S3 = 6 };
constexpr int kNumDegrees = 6;

HOST_DEVICE int taylor_degree(int index) {
  return index == 0 ? 1 : index == 1 ? 2 : index == 2 ? 4 : index == 3 ? 8 : index == 4 ? 12 : 18;
}

// theta_m: the largest 1-norm for which the degree-m approximant's backward error stays below the
// unit roundoff of the working precision (Bader, Blanes and Casas 2019, Table 1/2).
HOST_DEVICE double theta(int index, bool double_precision) {
  if (double_precision) {
    switch (index) {
      case 0: return 2.220446049250313e-16;
      case 1: return 2.580956802971767e-08;
      case 2: return 3.397168839976962e-04;
      case 3: return 4.991228871115323e-02;
      case 4: return 2.996158913811580e-01;
      default: return 1.090863719290036e+00;
    }
  }
  switch (index) {
    case 0: return 1.192092800768788e-07;
    case 1: return 5.978858893805233e-04;
    case 2: return 5.116619363445086e-02;
    case 3: return 5.800524627688768e-01;
    case 4: return 1.461661507209034e+00;
    default: return 3.010066362817634e+00;
  }
}

constexpr double kMaxFinite = 1.7976931348623157e308;

// Index of the cheapest degree whose theta covers `eta`, among the first `count` degrees; -1 if
// none does.
HOST_DEVICE int cheapest_degree(double eta, int count, bool double_precision) {
  for (int i = 0; i < count; ++i) {
    if (eta <= theta(i, double_precision)) return i;
  }
  return -1;
}

// Squarings s with eta / 2^s <= theta_18, i.e. ceil(log2(eta / theta_18)) for eta > theta_18.
// Bounded by the exponent range (<= ~1100 for any finite double), so the squaring loop ends.
HOST_DEVICE int squarings_for(double eta, bool double_precision) {
  int exponent = 0;
  const double fraction = frexp(eta / theta(kNumDegrees - 1, double_precision), &exponent);
  return fraction == 0.5 ? exponent - 1 : exponent;
}

// Degree 12 or 18 and the squarings for a matrix that no degree up to 8 covers, from the
// 1-norms of A, A^2 and A^3: alpha = max(||A^2||^(1/2), ||A^3||^(1/3)) <= ||A|| bounds the
// truncation error instead of ||A|| (Al-Mohy and Higham 2009, Thm 4.2), so a non-normal matrix
// needs far fewer squarings (a nilpotent one none) and rounds less. Shared by the kernels and
// the batched evaluation so both take the same s for the same norms.
struct HighDegreeScaling {
  int degree_index;
  int squarings;
  bool powers_finite;  // A^2 and A^3 did not overflow: they can be scaled instead of re-formed
};
HOST_DEVICE HighDegreeScaling high_degree_scaling(double norm, double norm2, double norm3,
                                                  bool double_precision) {
  // Tested on the norms themselves: fmax would drop a NaN (an Inf - Inf inside A^3).
  const bool powers_finite = norm2 <= kMaxFinite && norm3 <= kMaxFinite;
  const double alpha = fmax(sqrt(norm2), cbrt(norm3));
  const double eta = powers_finite ? fmin(norm, alpha) : norm;
  if (eta <= theta(kNumDegrees - 2, double_precision)) return {kNumDegrees - 2, 0, powers_finite};
  const bool scale = eta > theta(kNumDegrees - 1, double_precision);
  return {kNumDegrees - 1, scale ? squarings_for(eta, double_precision) : 0, powers_finite};
}

// ||X||_1 (largest column sum) of a row-major n x n matrix, for one serial participant; NaN
// anywhere gives NaN.
template <typename T>
HOST_DEVICE double norm1_serial(const T* X, int64_t n) {
  double best = 0.0;
  for (int64_t j = 0; j < n; ++j) {
    double column = 0.0;
    for (int64_t i = 0; i < n; ++i) column += fabs(static_cast<double>(X[i * n + j]));
    // NaN wins (max() would drop it) and stays: once best is NaN, no comparison replaces it.
    if (isnan(column) || column > best) best = column;
  }
  return best;
}

// One term c * slot of a linear combination; slot < 0: absent.
template <typename T>
struct Term {
  T c;
  int slot;
};

template <typename T>
HOST_DEVICE Term<T> none() {
  return Term<T>{T(0), -1};
}

// Z = cI * I + sum c_k X_k elementwise (Z may be one of the X_k); with kFrechet also
// LZ = sum c_k LX_k. One sweep per term keeps every loop a plain vectorisable axpy; each
// participant touches the same indices in every sweep, so only the diagonal needs a barrier.
// Ends with a barrier.
template <bool kFrechet, typename T, typename Backend, typename Dim>
HOST_DEVICE void combine(Backend& be, Dim n, T* ws, int z, T cI, Term<T> t0, Term<T> t1,
                         Term<T> t2 = none<T>(), Term<T> t3 = none<T>(), Term<T> t4 = none<T>()) {
  const int64_t nn = static_cast<int64_t>(n) * n;
  Term<T> terms[5] = {t0, t1, t2, t3, t4};
  int count = 0;
  for (int k = 0; k < 5; ++k) {
    if (terms[k].slot < 0) continue;
    // The term that reads Z itself goes first, before Z is overwritten.
    if (terms[k].slot == z && count > 0) {
      const Term<T> first = terms[0];
      terms[0] = terms[k];
      terms[count] = first;
    } else {
      terms[count] = terms[k];
    }
    ++count;
  }
  for (int pass = 0; pass < (kFrechet ? 2 : 1); ++pass) {
    const int64_t base = pass == 0 ? 0 : kSlots;
    T* Z = ws + (base + z) * nn;
    const T* X0 = ws + (base + terms[0].slot) * nn;
    const T c0 = terms[0].c;
    for (int64_t idx = be.first(); idx < nn; idx += be.stride()) Z[idx] = c0 * X0[idx];
    for (int k = 1; k < count; ++k) {
      const T* X = ws + (base + terms[k].slot) * nn;
      const T c = terms[k].c;
      for (int64_t idx = be.first(); idx < nn; idx += be.stride()) Z[idx] += c * X[idx];
    }
  }
  if (cI != T(0)) {  // derivative slots carry no identity term
    be.sync();
    T* Z = ws + z * nn;
    for (int64_t i = be.first(); i < n; i += be.stride()) Z[i * (n + 1)] += cI;
  }
  be.sync();
}

// Z = X Y; with kFrechet also LZ = LX Y + X LY. z differs from x and y. Ends with a barrier.
template <bool kFrechet, typename T, typename Backend, typename Dim>
HOST_DEVICE void product(Backend& be, Dim n, T* ws, int z, int x, int y) {
  const int64_t nn = static_cast<int64_t>(n) * n;
  T* Z = ws + z * nn;
  const T* X = ws + x * nn;
  const T* Y = ws + y * nn;
  be.gemm(Z, X, Y, false);
  if (kFrechet) {
    T* LZ = Z + kSlots * nn;
    be.gemm(LZ, X + kSlots * nn, Y, false);
    be.gemm(LZ, X, Y + kSlots * nn, true);
  }
  be.sync();
}

// The Taylor approximant of degree `degree` (1, 2, 4, 8, 12, 18) of Bader, Blanes and Casas (2019)
// at the matrix in slot A; degrees 12 and 18 need A2 = A^2 and A3 = A^3 formed. Returns the slot
// of the result. Written over `Ops` (product(z, x, y): Z = X Y; combine(z, cI, terms...):
// Z = cI I + sum c_k X_k; derivatives alongside where the ops keep them), so the one-matrix
// kernels and the batched ATen evaluation share it.
template <typename T, typename Ops>
HOST_DEVICE int taylor(Ops& ops, int degree) {
  using Tm = Term<T>;
  switch (degree) {
    case 1:
      ops.combine(A2, T(1), Tm{T(1), A}, none<T>());
      return A2;
    case 2:
      ops.product(A2, A, A);
      ops.combine(A2, T(1), Tm{T(1), A}, Tm{T(0.5), A2});
      return A2;
    case 4:
      ops.product(A2, A, A);
      ops.combine(S1, T(0.5), Tm{T(1.0 / 6.0), A}, Tm{T(1.0 / 24.0), A2});
      ops.product(S2, A2, S1);
      ops.combine(S2, T(1), Tm{T(1), A}, Tm{T(1), S2});
      return S2;
    case 8: {
      // Coefficients of the 1-norm-minimising degree-8 scheme (closed forms in sqrt(177)).
      constexpr double x3 = 2.0 / 3.0;
      constexpr double a1 = 0.1083646567852278, a2 = 0.02709116419630695;
      constexpr double u2 = 0.13549236135285073;
      constexpr double c0 = 0.546761457970724, c1 = 0.16112557339541758;
      constexpr double c2 = 0.014090917158378206, c4 = 0.0337927970108705;
      ops.product(A2, A, A);
      ops.combine(S1, T(0), Tm{T(a1), A}, Tm{T(a2), A2});
      ops.product(S2, A2, S1);  // A4
      ops.combine(S1, T(0), Tm{T(x3), A2}, Tm{T(1), S2});
      ops.combine(S3, T(c0), Tm{T(c1), A}, Tm{T(c2), A2}, Tm{T(c4), S2});
      ops.product(A3, S1, S3);  // A8
      ops.combine(A3, T(1), Tm{T(1), A}, Tm{T(u2), A2}, Tm{T(1), A3});
      return A3;
    }
    case 12: {  // A2, A3 formed above
      // q34 = a14 A + a24 A2 + a34 A3
      ops.combine(S1, T(0), Tm{T(-0.131810610138301840156819349464), A},
                  Tm{T(-0.0202785554058925907933568229945), A2},
                  Tm{T(-0.00675951846863086359778560766482), A3});
      ops.product(S2, S1, S1);
      // q61 = q33 + q34^2
      ops.combine(S2, T(0.211693118299809442949323323336),
                  Tm{T(0.158224384715726725371768893252), A},
                  Tm{T(0.165635169436727415011171668419), A2},
                  Tm{T(0.0107862779315792425026320640108), A3}, Tm{T(1), S2});
      // q32 + q61
      ops.combine(S1, T(4.6), Tm{T(0.992875103538486836140479571505), A},
                  Tm{T(-0.132445561052799638845074997454), A2}, Tm{T(0.0017299), A3},
                  Tm{T(1), S2});
      ops.product(S3, S1, S2);
      // + q31
      ops.combine(S3, T(-0.0186023205146205532243437300433),
                  Tm{T(-0.00500702322573317730979741843919), A},
                  Tm{T(-0.573420122960522263905952420789), A2},
                  Tm{T(-0.133399693943892059700768926983), A3}, Tm{T(1), S3});
      return S3;
    }
    default: {  // 18; A2, A3 formed above
      ops.product(A6, A3, A3);
      // q31 = a11 A + a21 A2 + a31 A3
      ops.combine(S1, T(0), Tm{T(-0.100365581030144620014614939405), A},
                  Tm{T(-0.00802924648241156960116919515244), A2},
                  Tm{T(-0.000892138498045729955685466128049), A3});
      // q64 = b24 A2 + b34 A3 + b64 A6
      ops.combine(S2, T(0), Tm{T(-0.0923364619367118592764570775143), A2},
                  Tm{T(-0.0169364939002081717191385115723), A3},
                  Tm{T(-0.0000140086798182036159794363205726), A6});
      ops.product(S3, S1, S2);
      // q91 = q31 q64 + q63
      ops.combine(S3, T(-0.09043168323908105619714688770183495),
                  Tm{T(-0.06764045190713819075600799003797075), A},
                  Tm{T(0.06759613017704596460827991950789371), A2},
                  Tm{T(0.02955525704293155274260691822422312), A3},
                  Tm{T(-0.00001391802575160607011247399793437424), A6}, Tm{T(1), S3});
      // q62 + q91
      ops.combine(S1, T(-10.96763960529620625935174626753684),
                  Tm{T(1.680158138789061971827854017248105), A},
                  Tm{T(0.05717798464788655127028717132252481), A2},
                  Tm{T(-0.006982101224880520842904664838015532), A3},
                  Tm{T(0.00003349750170860705383133673406684398), A6}, Tm{T(1), S3});
      ops.product(S2, S1, S3);
      // q18 = q61 + (q62 + q91) q91
      ops.combine(S2, T(0), Tm{T(0.3978497494996450761451961277102846), A},
                  Tm{T(1.367837784604117199225237068782228), A2},
                  Tm{T(0.4982896225253826775568588172622734), A3},
                  Tm{T(-0.0006378981945947233092415500564919286), A6}, Tm{T(1), S2});
      return S2;
    }
  }
}

// taylor's Ops over one matrix's workspace (the kernels' product and combine).
template <bool kFrechet, typename T, typename Backend, typename Dim>
struct WorkspaceOps {
  Backend& be;
  Dim n;
  T* ws;
  HOST_DEVICE void product(int z, int x, int y) { expm::product<kFrechet, T>(be, n, ws, z, x, y); }
  HOST_DEVICE void combine(int z, T cI, Term<T> t0, Term<T> t1, Term<T> t2 = none<T>(),
                           Term<T> t3 = none<T>(), Term<T> t4 = none<T>()) {
    expm::combine<kFrechet>(be, n, ws, z, cI, t0, t1, t2, t3, t4);
  }
};

// Multiplies slot `slot` (and its derivative) by 2^-exponent, exactly (a power of two); ldexp
// also covers exponents beyond 1023 (a huge but finite norm).
template <bool kFrechet, typename T, typename Backend, typename Dim>
HOST_DEVICE void scale_pow2(Backend& be, Dim n, T* ws, int slot, int exponent) {
  const int64_t nn = static_cast<int64_t>(n) * n;
  for (int pass = 0; pass < (kFrechet ? 2 : 1); ++pass) {
    T* Z = ws + (pass == 0 ? slot : kSlots + slot) * nn;
    for (int64_t idx = be.first(); idx < nn; idx += be.stride()) {
      Z[idx] = T(ldexp(static_cast<double>(Z[idx]), -exponent));
    }
  }
}

// Evaluates exp (and with kFrechet its derivative) in the workspace `ws` of 2 * kSlots (kSlots
// without the derivative) n x n matrices. On entry slot 0 holds A (and slot kSlots the
// direction E), visible to every participant. Returns the slot holding exp(A) (its derivative
// is in that slot + kSlots), NaN-filled when A is not finite.
//
// Dim is int64_t, or std::integral_constant<int64_t, N> for a size known at compile time (the
// CPU kernel's small-n instantiations, fully unrolled).
template <bool kFrechet, typename T, typename Backend, typename Dim>
HOST_DEVICE int exp_in_workspace(Backend& be, Dim n, T* ws) {
  const int64_t nn = static_cast<int64_t>(n) * n;
  constexpr bool kDouble = sizeof(T) == 8;
  const double norm = be.norm1(ws);
  if (!(norm <= kMaxFinite)) {  // NaN or Inf in A
    for (int pass = 0; pass < (kFrechet ? 2 : 1); ++pass) {
      T* Z = ws + (pass == 0 ? A2 : kSlots + A2) * nn;
      for (int64_t idx = be.first(); idx < nn; idx += be.stride()) Z[idx] = T(NAN);
    }
    be.sync();
    return A2;
  }
  // Degrees 1..8 when the norm alone allows them; otherwise A^2 and A^3, which degrees 12 and
  // 18 need anyway, refine the bound (high_degree_scaling).
  int degree_index = cheapest_degree(norm, kNumDegrees - 2, kDouble);
  int squarings = 0;
  if (degree_index < 0) {
    product<kFrechet, T>(be, n, ws, A2, A, A);
    product<kFrechet, T>(be, n, ws, A3, A, A2);
    const double norm2 = be.norm1(ws + A2 * nn), norm3 = be.norm1(ws + A3 * nn);
    const HighDegreeScaling scaling = high_degree_scaling(norm, norm2, norm3, kDouble);
    const bool powers_finite = scaling.powers_finite;
    degree_index = scaling.degree_index;
    squarings = scaling.squarings;
    if (squarings > 0) {
      scale_pow2<kFrechet>(be, n, ws, A, squarings);
      if (powers_finite) {  // (2^-s A)^k = 2^-ks A^k exactly
        scale_pow2<kFrechet>(be, n, ws, A2, 2 * squarings);
        scale_pow2<kFrechet>(be, n, ws, A3, 3 * squarings);
        be.sync();
      } else {  // A^2 or A^3 overflowed: form them again from the scaled A
        be.sync();
        product<kFrechet, T>(be, n, ws, A2, A, A);
        product<kFrechet, T>(be, n, ws, A3, A, A2);
      }
    }
  }
  WorkspaceOps<kFrechet, T, Backend, Dim> ops{be, n, ws};
  int result = taylor<T>(ops, taylor_degree(degree_index));
  for (int i = 0; i < squarings; ++i) {
    const int other = result == S1 ? S2 : S1;
    product<kFrechet, T>(be, n, ws, other, result, result);
    result = other;
  }
  return result;
}

}  // namespace expm
}  // namespace peft_kernels
