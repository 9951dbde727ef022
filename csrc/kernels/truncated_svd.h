// Batched truncated SVD building blocks, shared by the CPU and CUDA kernels.
//
//   jacobi       one-sided (Hestenes) Jacobi SVD of a batch of m x n matrices, m >= n: column
//                pairs (p, q) are rotated until every pair is orthogonal to working precision,
//                A V = X with X's columns mutually orthogonal, so s_j = |x_j|, u_j = x_j / s_j.
//                One-sided Jacobi computes singular values to high relative accuracy (Demmel and
//                Veselic, SIMAX 13(4), 1992).
//   orthonormalize  Gram-Schmidt with a second pass ("twice is enough", Giraud et al. 2005; the
//                CPU kernel projects classically, four vectors per pass over the target, the CUDA
//                kernel in modified order), over l vectors of length m (l <= m) in order; a
//                vector that loses (almost) all its
//                norm to the ones before it is replaced by the standard basis vector least
//                represented in them, so the result is always an orthonormal set.
//
// Layout: a matrix's columns are rows of the stored array ("column rows"): X [batch, n, m] holds
// column j of the m x n matrix at X[b, j, :], contiguous, so every dot product and rotation runs
// over contiguous memory. V is stored the same way: V[b, j, :] is column j of V, i.e. row j of
// Vh. Results are not sorted; csrc/ops sorts, truncates and fixes signs.
//
// No torch headers: nvcc compiles this on machines without a CUDA torch.
#pragma once
#include <math.h>

#include <cstdint>

#include "kernels/common.h"

namespace peft_kernels {

struct JacobiSvdParams {
  void* x = nullptr;         // [batch, n, m] in/out: the matrix's columns; on return A V
  void* v = nullptr;         // [batch, n, n] out: V's columns (rows of Vh)
  int32_t* sweeps = nullptr; // [batch] out: sweeps run (<= max_sweeps); svd::kNotConverged when
                             // max_sweeps ran without convergence; svd::kNonFinite when the
                             // matrix held a NaN/Inf (x and v are then NaN)
  int64_t batch = 0, m = 0, n = 0;  // m >= n
  int max_sweeps = 0;
  double tol = 0.0;  // pair (p, q) is orthogonal when |x_p . x_q| <= tol |x_p| |x_q|
  // [batch] or null: a column whose squared norm is at or below this is set to zero and left out
  // of the rotations (see svd::negligible).
  const double* negligible = nullptr;
  DType dtype = DType::kFloat32;  // float32 / float64
};

struct OrthonormalizeParams {
  void* q = nullptr;  // [batch, l, m] in/out: l vectors of length m, orthonormalised in order
  int64_t batch = 0, m = 0, l = 0;  // l <= m
  DType dtype = DType::kFloat32;  // float32 / float64
};

// CPU: float32 / float64, parallel over the batch.
void jacobi_svd_cpu(const JacobiSvdParams& p);
void orthonormalize_cpu(const OrthonormalizeParams& p);
// CUDA: float32 / float64 (csrc/ops computes half types in float32), one thread block per matrix.
void jacobi_svd_cuda(const JacobiSvdParams& p, cudaStream_t stream);
void orthonormalize_cuda(const OrthonormalizeParams& p, cudaStream_t stream);

namespace svd {

constexpr int32_t kNotConverged = -1;
constexpr int32_t kNonFinite = -2;

// A vector keeps its own direction when more than this fraction of its norm survives the
// projections (after the second pass); otherwise it counts as dependent on the ones before it.
HOST_DEVICE double dependence_threshold(bool double_precision) {
  return double_precision ? 1e-10 : 1e-4;
}

// The rotation that makes columns p and q orthogonal, from alpha = |x_p|^2, beta = |x_q|^2,
// gamma = x_p . x_q (gamma != 0): x_p <- c x_p - s x_q, x_q <- s x_p + c x_q (Rutishauser's
// formulas: t is the smaller root of t^2 + 2 zeta t - 1 = 0, so |t| <= 1 and the angle is at
// most pi / 4). For |zeta| large, sqrt(1 + zeta^2) is formed without squaring zeta.
template <typename T>
struct Rotation {
  T c, s;
};

// The tangent t alone: its norm updates are alpha - t gamma and beta + t gamma. Branch-free (the
// root as max(|zeta|, 1) sqrt(1 + (min / max)^2)), so a batch of pairs forms it in vectors.
template <typename T>
HOST_DEVICE T jacobi_tangent(T alpha, T beta, T gamma) {
  const T zeta = (beta - alpha) / (T(2) * gamma);
  const T az = fabs(zeta);
  const T big = az > T(1) ? az : T(1), small = az > T(1) ? T(1) : az;
  const T ratio = small / big;
  const T root = big * sqrt(T(1) + ratio * ratio);
  return (zeta >= T(0) ? T(1) : T(-1)) / (az + root);
}

template <typename T>
HOST_DEVICE Rotation<T> jacobi_rotation(T alpha, T beta, T gamma) {
  const T t = jacobi_tangent(alpha, beta, gamma);
  const T c = T(1) / sqrt(T(1) + t * t);
  return {c, c * t};
}

// Whether the pair needs a rotation: |gamma| > tol sqrt(alpha) sqrt(beta) (square roots taken
// separately so that tiny or huge norms neither underflow nor overflow), and gamma != 0.
template <typename T>
HOST_DEVICE bool needs_rotation(T alpha, T beta, T gamma, T tol) {
  return (gamma != T(0)) & (fabs(gamma) > tol * sqrt(alpha) * sqrt(beta));
}

// float: the same test squared, in double, where a float's squared norms cannot overflow or
// underflow; without the two square roots on the path of every pair, converged pairs included.
HOST_DEVICE bool needs_rotation(float alpha, float beta, float gamma, float tol) {
  const double g = gamma, t = tol;
  return (gamma != 0.0f) & (g * g > t * t * static_cast<double>(alpha) * static_cast<double>(beta));
}

// A column of a rank-deficient matrix that Jacobi drives towards zero may never reach it: with
// nearly parallel partners each rotation leaves its rounding error, eps of its norm, and that
// residue goes on being rotated until its squared norm underflows and the test can no longer
// settle (18 of 200 float32 17 x 8 matrices with a duplicated column ran into the sweep bound,
// Jacobi on R^T of their QR). Columns at or below eps^2 |A|_F (squared: `limit`, see
// JacobiSvdParams::negligible) are therefore zero; a singular value that small is below what
// the working precision resolves in |A|.
template <typename T>
HOST_DEVICE bool negligible(T squared_norm, double limit) {
  return static_cast<double>(squared_norm) <= limit;
}

// Round-robin (tournament) ordering: for n' = n rounded up to even, round r in [0, n' - 1) pairs
// slot i with slot n' - 1 - i (i < n' / 2), where slot 0 holds index 0 and slots 1.. rotate. Every
// pair (p, q) occurs exactly once per sweep and a round's pairs are disjoint, so they can be
// rotated in parallel. An index >= n (the padding when n is odd) sits the round out.
HOST_DEVICE int64_t round_robin_index(int64_t slot, int64_t round, int64_t n_even) {
  if (slot == 0) return 0;
  return 1 + (slot - 1 + round) % (n_even - 1);
}

}  // namespace svd
}  // namespace peft_kernels
