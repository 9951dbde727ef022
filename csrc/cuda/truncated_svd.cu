// CUDA kernels of the batched truncated-SVD building blocks (see kernels/truncated_svd.h). One
// block of kThreads threads per matrix (the grid loops over the batch past kMaxGrid blocks); the
// matrices stay in global memory: a column pair, or the vectors being orthonormalised, of the
// shapes used stay L2-resident.
//
//   jacobi_svd_kernel      one-sided Jacobi in round-robin order. A round's column pairs are
//                          disjoint, so warp w rotates pairs w, w + kWarps, ... of the round on
//                          its own: alpha, beta, gamma by lane-strided loops and a shuffle
//                          reduction, then the rotation of both X columns and both V columns.
//                          A barrier separates rounds; __syncthreads_or at the end of a sweep
//                          tells every thread whether any warp rotated.
//   orthonormalize_kernel  modified Gram-Schmidt, two passes per vector. Thread t owns elements
//                          t, t + kThreads, ... of every vector (and those rows in the search
//                          for a replacement basis vector), so the updates need no barrier:
//                          threads only meet in block reductions.
//
// Reductions run in a fixed order (a lane butterfly, then the warp partials summed in warp
// order), so results are reproducible from run to run. The butterfly adds the same two operands
// in every lane (a + b == b + a bit for bit), so every lane, and after the partials every
// thread, holds the same bits: branches on reduced values are uniform.

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>

#include "kernels/truncated_svd.h"

namespace peft_kernels {
namespace {

constexpr int kWarpSize = 32;
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / kWarpSize;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int64_t kMaxGrid = 2147483647;  // gridDim.x limit; the kernels loop beyond it

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    v += __shfl_xor_sync(kFullMask, v, offset);
  }
  return v;
}

// ---------------------------------------------------------------------------------------------
// jacobi

// x_p <- c x_p - s x_q, x_q <- s x_p + c x_q over `len` elements, lane-strided.
template <typename T>
__device__ __forceinline__ void rotate_columns(T* __restrict__ xp, T* __restrict__ xq, int64_t len,
                                               int lane, svd::Rotation<T> r) {
#pragma unroll 4
  for (int64_t k = lane; k < len; k += kWarpSize) {
    const T a = xp[k], b = xq[k];
    xp[k] = r.c * a - r.s * b;
    xq[k] = r.s * a + r.c * b;
  }
}

// One warp: makes columns p < q of x (length m) orthogonal, carrying the rotation into V's
// columns p, q (length n). Returns whether it rotated (the same answer in every lane).
template <typename T>
__device__ __forceinline__ bool orthogonalize_pair(T* __restrict__ x, T* __restrict__ v, int64_t p,
                                                   int64_t q, int64_t m, int64_t n, int lane,
                                                   T tol, double limit) {
  T* xp = x + p * m;
  T* xq = x + q * m;
  T alpha = T(0), beta = T(0), gamma = T(0);
#pragma unroll 4
  for (int64_t k = lane; k < m; k += kWarpSize) {
    const T a = xp[k], b = xq[k];
    alpha += a * a;
    beta += b * b;
    gamma += a * b;
  }
  alpha = warp_sum(alpha);
  beta = warp_sum(beta);
  gamma = warp_sum(gamma);
  // alpha and beta hold the same bits in every lane: the branches are uniform.
  const bool zero_p = svd::negligible(alpha, limit), zero_q = svd::negligible(beta, limit);
  if (zero_p || zero_q) {
    for (int64_t k = lane; k < m; k += kWarpSize) {
      if (zero_p) xp[k] = T(0);
      if (zero_q) xq[k] = T(0);
    }
    return false;
  }
  if (!svd::needs_rotation(alpha, beta, gamma, tol)) return false;
  const svd::Rotation<T> r = svd::jacobi_rotation(alpha, beta, gamma);
  rotate_columns(xp, xq, m, lane, r);
  rotate_columns(v + p * n, v + q * n, n, lane, r);
  return true;
}

// At least 2 blocks per SM: a plain __launch_bounds__(kThreads) lets ptxas cap this kernel at 64
// registers, which spills in float64 on sm_80; 2 leaves it ~80-90 with the loads unrolled.
template <typename T>
__global__ void __launch_bounds__(kThreads, 2)
    jacobi_svd_kernel(T* __restrict__ X, T* __restrict__ V, int32_t* __restrict__ sweeps,
                      int64_t batch, int64_t m, int64_t n, int max_sweeps, T tol,
                      const double* __restrict__ negligible) {
  const int tid = static_cast<int>(threadIdx.x);
  const int lane = tid % kWarpSize, warp = tid / kWarpSize;
  const int64_t n_even = n + (n & 1);
  const int64_t pairs_per_round = n_even / 2;
  for (int64_t b = blockIdx.x; b < batch; b += gridDim.x) {
    T* x = X + b * n * m;
    T* v = V + b * n * n;
    const double limit = negligible != nullptr ? negligible[b] : -1.0;

    // A NaN / Inf would make every later comparison meaningless (and a NaN gamma never
    // converges), so such a matrix is reported instead of swept.
    bool non_finite = false;
    for (int64_t k = tid; k < n * m; k += kThreads) {
      if (!isfinite(x[k])) non_finite = true;
    }
    if (__syncthreads_or(non_finite)) {  // also orders the reads above before the fill
      const T nan = T(NAN);
      for (int64_t k = tid; k < n * m; k += kThreads) x[k] = nan;
      for (int64_t k = tid; k < n * n; k += kThreads) v[k] = nan;
      if (tid == 0) sweeps[b] = svd::kNonFinite;
      continue;
    }
    for (int64_t k = tid; k < n * n; k += kThreads) v[k] = k % (n + 1) == 0 ? T(1) : T(0);
    __syncthreads();  // V's identity is written by all threads, rotated by warps

    int32_t result = svd::kNotConverged;
    for (int sweep = 1; sweep <= max_sweeps; ++sweep) {
      bool rotated = false;
      for (int64_t round = 0; round < n_even - 1; ++round) {
        for (int64_t i = warp; i < pairs_per_round; i += kWarps) {
          const int64_t a = svd::round_robin_index(i, round, n_even);
          const int64_t c = svd::round_robin_index(n_even - 1 - i, round, n_even);
          // Rotate as (min, max) whatever the slot order: the CPU kernel rotates p < q.
          const int64_t p = a < c ? a : c, q = a < c ? c : a;
          if (q >= n) continue;  // the padding index of odd n sits the round out
          if (orthogonalize_pair(x, v, p, q, m, n, lane, tol, limit)) rotated = true;
        }
        __syncthreads();  // the next round pairs these columns with ones other warps rotated
      }
      if (!__syncthreads_or(rotated)) {
        result = sweep;
        break;
      }
    }
    if (tid == 0) sweeps[b] = result;
  }
}

// ---------------------------------------------------------------------------------------------
// orthonormalize

// Block-wide sum, the result in every thread. The warp partials alternate between two buffers:
// a thread writes buffer k % 2 only after passing reduction k - 1's barrier, which every thread
// reaches only after reading reduction k - 2's partials, so one barrier per reduction suffices.
// Every thread must call it the same number of times.
template <typename T>
struct BlockSum {
  T (*partials)[kWarps];  // [2][kWarps] in shared memory
  int parity = 0;

  __device__ __forceinline__ T operator()(T v) {
    v = warp_sum(v);
    const int tid = static_cast<int>(threadIdx.x);
    T* buffer = partials[parity];
    parity ^= 1;
    if (tid % kWarpSize == 0) buffer[tid / kWarpSize] = v;
    __syncthreads();
    T total = buffer[0];
#pragma unroll
    for (int w = 1; w < kWarps; ++w) total += buffer[w];
    return total;
  }
};

// This thread's part of a . b over its elements.
template <typename T>
__device__ __forceinline__ T partial_dot(const T* __restrict__ a, const T* __restrict__ b,
                                         int64_t m) {
  T acc = T(0);
  for (int64_t k = threadIdx.x; k < m; k += kThreads) acc += a[k] * b[k];
  return acc;
}

// One modified Gram-Schmidt pass: w -= (q_i . w) q_i for i = 0 .. j - 1 in order.
template <typename T>
__device__ __forceinline__ void project_out(const T* __restrict__ q, T* __restrict__ w, int64_t j,
                                            int64_t m, BlockSum<T>& sum) {
  for (int64_t i = 0; i < j; ++i) {
    const T* qi = q + i * m;
    const T coeff = sum(partial_dot(qi, w, m));
    for (int64_t k = threadIdx.x; k < m; k += kThreads) w[k] -= coeff * qi[k];
  }
}

struct ArgMin {
  double value;  // T converts exactly
  int64_t index;
};

// Smaller value wins; equal values go to the smaller index, so the result does not depend on the
// combination order (and the butterfly gives every lane the same winner). NaN never wins.
__device__ __forceinline__ ArgMin better(ArgMin a, ArgMin b) {
  return (b.value < a.value || (b.value == a.value && b.index < a.index)) ? b : a;
}

// The row t of q_0 .. q_{j-1} with the smallest sum of squares, i.e. the standard basis vector
// e_t with the largest residual 1 - sum_i q_i[t]^2 (at least (m - j) / m); the smallest t on
// ties. The sum itself is compared, as the CPU kernel does: 1 - sum would round near-ties
// together.
template <typename T>
__device__ int64_t least_represented_row(const T* __restrict__ q, int64_t j, int64_t m,
                                         double* __restrict__ warp_value,
                                         int64_t* __restrict__ warp_index) {
  const int tid = static_cast<int>(threadIdx.x);
  ArgMin best{INFINITY, m};
  for (int64_t t = tid; t < m; t += kThreads) {
    T represented = T(0);
    for (int64_t i = 0; i < j; ++i) represented += q[i * m + t] * q[i * m + t];
    const ArgMin candidate{static_cast<double>(represented), t};
    best = better(best, candidate);
  }
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    const ArgMin other{__shfl_xor_sync(kFullMask, best.value, offset),
                       __shfl_xor_sync(kFullMask, best.index, offset)};
    best = better(best, other);
  }
  if (tid % kWarpSize == 0) {
    warp_value[tid / kWarpSize] = best.value;
    warp_index[tid / kWarpSize] = best.index;
  }
  __syncthreads();
  for (int w = 0; w < kWarps; ++w) best = better(best, ArgMin{warp_value[w], warp_index[w]});
  // The next call rewrites warp_value / warp_index. The kernel's norm reduction in between
  // already orders that; the barrier keeps the function safe on its own.
  __syncthreads();
  // Only NaN sums everywhere leave the index at m; e_0 then keeps it in range.
  return best.index < m ? best.index : 0;
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    orthonormalize_kernel(T* __restrict__ Q, int64_t batch, int64_t m, int64_t l) {
  __shared__ T partials[2][kWarps];
  __shared__ double warp_value[kWarps];
  __shared__ int64_t warp_index[kWarps];
  const int tid = static_cast<int>(threadIdx.x);
  const T threshold = static_cast<T>(svd::dependence_threshold(sizeof(T) == sizeof(double)));
  BlockSum<T> sum{partials};
  for (int64_t b = blockIdx.x; b < batch; b += gridDim.x) {
    T* q = Q + b * l * m;
    for (int64_t j = 0; j < l; ++j) {
      T* w = q + j * m;
      const T norm0 = sqrt(sum(partial_dot(w, w, m)));
      project_out(q, w, j, m, sum);
      project_out(q, w, j, m, sum);
      T norm = sqrt(sum(partial_dot(w, w, m)));
      // Dependent (or zero): too little of the norm survived. NaN fails the comparison too but
      // is left to propagate.
      if (!(norm > threshold * norm0) && !isnan(norm)) {
        const int64_t t = least_represented_row(q, j, m, warp_value, warp_index);
        for (int64_t k = tid; k < m; k += kThreads) w[k] = k == t ? T(1) : T(0);
        project_out(q, w, j, m, sum);
        project_out(q, w, j, m, sum);
        norm = sqrt(sum(partial_dot(w, w, m)));
      }
      const T inv_norm = T(1) / norm;  // as the CPU kernel scales
      for (int64_t k = tid; k < m; k += kThreads) w[k] *= inv_norm;
    }
  }
}

// ---------------------------------------------------------------------------------------------

unsigned grid_for(int64_t batch) { return static_cast<unsigned>(std::min(batch, kMaxGrid)); }

template <typename T>
void launch_jacobi(const JacobiSvdParams& p, cudaStream_t stream) {
  jacobi_svd_kernel<T><<<grid_for(p.batch), kThreads, 0, stream>>>(
      static_cast<T*>(p.x), static_cast<T*>(p.v), p.sweeps, p.batch, p.m, p.n, p.max_sweeps,
      static_cast<T>(p.tol), p.negligible);
}

template <typename T>
void launch_orthonormalize(const OrthonormalizeParams& p, cudaStream_t stream) {
  orthonormalize_kernel<T><<<grid_for(p.batch), kThreads, 0, stream>>>(static_cast<T*>(p.q),
                                                                       p.batch, p.m, p.l);
}

}  // namespace

void jacobi_svd_cuda(const JacobiSvdParams& p, cudaStream_t stream) {
  if (p.batch <= 0 || p.n <= 0) return;
  switch (p.dtype) {
    case DType::kFloat32: launch_jacobi<float>(p, stream); break;
    case DType::kFloat64: launch_jacobi<double>(p, stream); break;
    default:  // csrc/ops computes half types in float32: reaching here is a wiring error
      throw std::logic_error("truncated_svd: the CUDA kernels take float32 or float64");
  }
}

void orthonormalize_cuda(const OrthonormalizeParams& p, cudaStream_t stream) {
  if (p.batch <= 0 || p.l <= 0 || p.m <= 0) return;
  switch (p.dtype) {
    case DType::kFloat32: launch_orthonormalize<float>(p, stream); break;
    case DType::kFloat64: launch_orthonormalize<double>(p, stream); break;
    default:  // csrc/ops computes half types in float32: reaching here is a wiring error
      throw std::logic_error("truncated_svd: the CUDA kernels take float32 or float64");
  }
}

}  // namespace peft_kernels
