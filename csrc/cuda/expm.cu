// CUDA kernels of the batched matrix exponential (see kernels/expm.h): one thread block per
// matrix, so every matrix gets its own Taylor degree and squarings and the evaluation needs no
// synchronisation beyond __syncthreads().
//
//   expm_shared_kernel   the whole workspace (7 or 14 n x n matrices in the compute type) in
//                        dynamic shared memory, products straight from it: each thread owns a
//                        kT x kT register tile (kT = 1, 2, 4 by n). Up to n = 90 (float) / 64
//                        (double) forward and 64 / 45 backward with 227 KB of shared memory.
//   expm_global_kernel   larger n: the workspace in the caller's global buffer (one per resident
//                        block, the grid loops over matrices), products tiled through shared
//                        memory (64 x 64 output tiles, 32-deep k tiles, 4 x 4 per thread).
//
// The block code is written over a `Threads` policy (rank, size, barrier) so that it can also be
// driven by host threads in a CPU emulation; CudaBlock is the only policy used here.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/elem.cuh"
#include "kernels/expm.h"

namespace peft_kernels {
namespace {

constexpr int kMaxThreads = 256;           // shared-memory kernel: at most this many threads
constexpr int kTileThreads = 256;          // global-memory kernel: exactly this many
constexpr int kTileM = 64;                 // output tile side of the global-memory product
constexpr int kTileK = 32;                 // k depth of its shared-memory tiles
constexpr int kTileR = kTileM / 16;        // 4 x 4 outputs per thread (16 x 16 threads)
constexpr int kDefaultSmem = 48 * 1024;    // dynamic shared memory without opting in
constexpr int64_t kMaxGrid = 2147483647;   // gridDim.x limit; the kernels loop beyond it
constexpr int64_t kMaxSharedN = 4096;      // n beyond this never fits (avoids n * n overflow)

// ---------------------------------------------------------------------------------------------
// Element types and fused multiply-add: cuda/elem.cuh.
using cu::AccT;
using cu::Elem;
using cu::madd;

struct CudaBlock {
  static __device__ __forceinline__ int rank() { return static_cast<int>(threadIdx.x); }
  static __device__ __forceinline__ int size() { return static_cast<int>(blockDim.x); }
  static __device__ __forceinline__ void barrier() { __syncthreads(); }
};

HOST_DEVICE double nan_max(double a, double b) { return (isnan(a) || a >= b) ? a : b; }


// The participant interface of expm::exp_in_workspace for one thread block. `red` is shared
// memory for one double per thread (the 1-norm reduction).
template <typename T, typename Threads>
struct BlockBackend {
  int64_t n;
  double* red;

  HOST_DEVICE int64_t first() const { return Threads::rank(); }
  HOST_DEVICE int64_t stride() const { return Threads::size(); }
  HOST_DEVICE void sync() const { Threads::barrier(); }

  // Column sums by column-owning threads (coalesced: neighbouring threads, neighbouring
  // columns), then a tree max over the block in which NaN wins; every thread gets the result.
  HOST_DEVICE double norm1(const T* X) const {
    const int tid = Threads::rank(), nt = Threads::size();
    double best = 0.0;
    for (int64_t j = tid; j < n; j += nt) {
      double column = 0.0;
      for (int64_t i = 0; i < n; ++i) column += fabs(static_cast<double>(X[i * n + j]));
      if (isnan(column) || column > best) best = column;  // NaN wins and stays
    }
    // Every thread must have read the previous call's result (red[0]) before red is reused:
    // the evaluation calls norm1 back to back for A^2 and A^3.
    Threads::barrier();
    red[tid] = best;
    Threads::barrier();
    int half = 1;
    while (2 * half < nt) half *= 2;
    for (; half > 0; half /= 2) {
      if (tid < half && tid + half < nt) red[tid] = nan_max(red[tid], red[tid + half]);
      Threads::barrier();
    }
    return red[0];
  }
};

// Z (+)= X Y, all in shared memory. Thread task t owns the kT x kT outputs (ti + r c, tj + s c),
// c = ceil(n / kT), (ti, tj) = (t / c, t % c): neighbouring threads read neighbouring columns of
// Y (no bank conflicts) and mostly the same row of X (broadcast). A task's outputs depend only on
// t, so the back-to-back products of expm::product need no barrier between them.
template <int kT, typename T, typename Threads>
__host__ __device__ __noinline__ void shared_gemm(int n, T* Z, const T* X, const T* Y,
                                                  bool accumulate) {
  const int c = (n + kT - 1) / kT;
  const int tasks = c * c;
  for (int t = Threads::rank(); t < tasks; t += Threads::size()) {
    const int ti = t / c, tj = t - ti * c;
    int row[kT], col[kT];
#pragma unroll
    for (int r = 0; r < kT; ++r) {
      // Rows / columns past the end are clamped for the reads and skipped on the write.
      row[r] = ti + r * c < n ? ti + r * c : n - 1;
      col[r] = tj + r * c < n ? tj + r * c : n - 1;
    }
    T acc[kT][kT];
#pragma unroll
    for (int r = 0; r < kT; ++r) {
#pragma unroll
      for (int s = 0; s < kT; ++s) acc[r][s] = T(0);
    }
#pragma unroll 4
    for (int k = 0; k < n; ++k) {
      T x[kT], y[kT];
#pragma unroll
      for (int r = 0; r < kT; ++r) x[r] = X[row[r] * n + k];
#pragma unroll
      for (int s = 0; s < kT; ++s) y[s] = Y[k * n + col[s]];
#pragma unroll
      for (int r = 0; r < kT; ++r) {
#pragma unroll
        for (int s = 0; s < kT; ++s) acc[r][s] = madd(x[r], y[s], acc[r][s]);
      }
    }
#pragma unroll
    for (int r = 0; r < kT; ++r) {
      if (ti + r * c >= n) continue;
#pragma unroll
      for (int s = 0; s < kT; ++s) {
        if (tj + s * c >= n) continue;
        T* z = Z + row[r] * n + col[s];
        *z = accumulate ? *z + acc[r][s] : acc[r][s];
      }
    }
  }
}

template <int kT, typename T, typename Threads>
struct SharedBackend : BlockBackend<T, Threads> {
  HOST_DEVICE void gemm(T* Z, const T* X, const T* Y, bool accumulate) const {
    shared_gemm<kT, T, Threads>(static_cast<int>(this->n), Z, X, Y, accumulate);
  }
};

// Z (+)= X Y in global memory, through shared-memory tiles xs[kTileK][kTileM + 1] (X transposed:
// the pad keeps its transposing stores conflict-free) and ys[kTileK][kTileM]. Needs exactly
// kTileThreads threads; thread (tx, ty) owns outputs (ty + 16 r, tx + 16 s) of each 64 x 64 output
// tile, the same ones in every call. Ends with a barrier (the tiles are reused by the next call).
// The workspace is written inside the kernel, so it is read through plain (coherent) loads.
template <typename T, typename Threads>
__host__ __device__ __noinline__ void global_gemm(int64_t n, T* Z, const T* X, const T* Y,
                                                  bool accumulate, T* xs, T* ys) {
  constexpr int kPitchX = kTileM + 1;
  const int tid = Threads::rank();
  const int tx = tid % 16, ty = tid / 16;
  for (int64_t i0 = 0; i0 < n; i0 += kTileM) {
    for (int64_t j0 = 0; j0 < n; j0 += kTileM) {
      T acc[kTileR][kTileR];
#pragma unroll
      for (int r = 0; r < kTileR; ++r) {
#pragma unroll
        for (int s = 0; s < kTileR; ++s) acc[r][s] = T(0);
      }
      for (int64_t k0 = 0; k0 < n; k0 += kTileK) {
        // X[i0 + m][k0 + k] -> xs[k][m]: a warp reads 32 consecutive k of one row.
#pragma unroll
        for (int step = 0; step < kTileM * kTileK / kTileThreads; ++step) {
          const int e = tid + step * kTileThreads;
          const int m = e / kTileK, k = e % kTileK;
          const int64_t i = i0 + m, kk = k0 + k;
          xs[k * kPitchX + m] = (i < n && kk < n) ? X[i * n + kk] : T(0);
        }
        // Y[k0 + k][j0 + m] -> ys[k][m]
#pragma unroll
        for (int step = 0; step < kTileM * kTileK / kTileThreads; ++step) {
          const int e = tid + step * kTileThreads;
          const int k = e / kTileM, m = e % kTileM;
          const int64_t kk = k0 + k, j = j0 + m;
          ys[k * kTileM + m] = (kk < n && j < n) ? Y[kk * n + j] : T(0);
        }
        Threads::barrier();
#pragma unroll 8
        for (int k = 0; k < kTileK; ++k) {
          T x[kTileR], y[kTileR];
#pragma unroll
          for (int r = 0; r < kTileR; ++r) x[r] = xs[k * kPitchX + ty + 16 * r];
#pragma unroll
          for (int s = 0; s < kTileR; ++s) y[s] = ys[k * kTileM + tx + 16 * s];
#pragma unroll
          for (int r = 0; r < kTileR; ++r) {
#pragma unroll
            for (int s = 0; s < kTileR; ++s) acc[r][s] = madd(x[r], y[s], acc[r][s]);
          }
        }
        Threads::barrier();  // the next k tile overwrites xs / ys
      }
#pragma unroll
      for (int r = 0; r < kTileR; ++r) {
        const int64_t i = i0 + ty + 16 * r;
        if (i >= n) continue;
#pragma unroll
        for (int s = 0; s < kTileR; ++s) {
          const int64_t j = j0 + tx + 16 * s;
          if (j >= n) continue;
          T* z = Z + i * n + j;
          *z = accumulate ? *z + acc[r][s] : acc[r][s];
        }
      }
    }
  }
}

template <typename T, typename Threads>
struct GlobalBackend : BlockBackend<T, Threads> {
  T* xs;  // shared kTileK x (kTileM + 1)
  T* ys;  // shared kTileK x kTileM
  HOST_DEVICE void gemm(T* Z, const T* X, const T* Y, bool accumulate) const {
    global_gemm<T, Threads>(this->n, Z, X, Y, accumulate, xs, ys);
  }
};

// One matrix by one block: load A (A^T and the direction G for the gradient) into the workspace,
// evaluate, store exp(A) (or L(A^T, G)). a, g and out point at this matrix.
template <bool kFrechet, typename In, typename Backend>
HOST_DEVICE void expm_matrix(Backend& be, int64_t n, const In* a, const In* g, In* out,
                             AccT<In>* ws) {
  using Acc = AccT<In>;
  const int64_t nn = n * n;
  if (!kFrechet) {
    for (int64_t idx = be.first(); idx < nn; idx += be.stride()) ws[idx] = Elem<In>::load(a[idx]);
  } else {
    // Coalesced reads of A, transposing writes into the workspace.
    for (int64_t idx = be.first(); idx < nn; idx += be.stride()) {
      const int64_t i = idx / n, j = idx - i * n;
      ws[j * n + i] = Elem<In>::load(a[idx]);
    }
    Acc* E = ws + expm::kSlots * nn;
    for (int64_t idx = be.first(); idx < nn; idx += be.stride()) E[idx] = Elem<In>::load(g[idx]);
  }
  be.sync();
  // The result slot is never slot 0 (nor its derivative slot kSlots), which the next matrix's
  // load overwrites; that load is followed by a barrier before any other slot is written.
  const int slot = expm::exp_in_workspace<kFrechet, Acc>(be, n, ws);
  const Acc* result = ws + (kFrechet ? expm::kSlots + slot : slot) * nn;
  for (int64_t idx = be.first(); idx < nn; idx += be.stride()) {
    out[idx] = Elem<In>::store(result[idx]);
  }
}

template <bool kFrechet>
constexpr int64_t kWorkspaceSlots = (kFrechet ? 2 : 1) * expm::kSlots;

// Dynamic shared memory: blockDim.x doubles of reduction scratch, then the workspace.
template <bool kFrechet, typename In, int kT>
__global__ void __launch_bounds__(kMaxThreads)
    expm_shared_kernel(const In* __restrict__ a, const In* __restrict__ g, In* __restrict__ out,
                       int64_t batch, int64_t n) {
  using Acc = AccT<In>;
  extern __shared__ __align__(16) unsigned char expm_smem[];
  SharedBackend<kT, Acc, CudaBlock> be;
  be.n = n;
  be.red = reinterpret_cast<double*>(expm_smem);
  Acc* ws = reinterpret_cast<Acc*>(expm_smem + blockDim.x * sizeof(double));
  const int64_t nn = n * n;
  for (int64_t b = blockIdx.x; b < batch; b += gridDim.x) {
    expm_matrix<kFrechet, In>(be, n, a + b * nn, kFrechet ? g + b * nn : nullptr, out + b * nn,
                              ws);
  }
}

// workspace: gridDim.x workspaces of kWorkspaceSlots<kFrechet> n x n matrices, one per block.
template <bool kFrechet, typename In>
__global__ void __launch_bounds__(kTileThreads, 2)
    expm_global_kernel(const In* __restrict__ a, const In* __restrict__ g, In* __restrict__ out,
                       int64_t batch, int64_t n, AccT<In>* workspace) {
  using Acc = AccT<In>;
  __shared__ double red[kTileThreads];
  __shared__ Acc xs[kTileK * (kTileM + 1)];
  __shared__ Acc ys[kTileK * kTileM];
  GlobalBackend<Acc, CudaBlock> be;
  be.n = n;
  be.red = red;
  be.xs = xs;
  be.ys = ys;
  const int64_t nn = n * n;
  Acc* ws = workspace + static_cast<int64_t>(blockIdx.x) * kWorkspaceSlots<kFrechet> * nn;
  for (int64_t b = blockIdx.x; b < batch; b += gridDim.x) {
    expm_matrix<kFrechet, In>(be, n, a + b * nn, kFrechet ? g + b * nn : nullptr, out + b * nn,
                              ws);
  }
}

// ---------------------------------------------------------------------------------------------
// Launch configuration, shared by expm_cuda_workspace_bytes and expm_cuda so that both take the
// same path.

struct Config {
  bool shared = false;
  int tile = 1;             // shared path: register tile side kT
  int threads = 0;
  int64_t grid = 0;
  size_t smem = 0;          // shared path: dynamic shared memory bytes
  int smem_optin = 0;       // the device's per-block maximum after opting in
  int64_t workspace = 0;    // global path: workspace bytes
};

// Register tile of the shared-memory product: one output per thread while n^2 <= 256, then 2 x 2
// and 4 x 4 so that about 256 threads cover the matrix.
int shared_tile(int64_t n) { return n <= 16 ? 1 : (n <= 48 ? 2 : 4); }

int shared_threads(int64_t n, int tile) {
  const int64_t side = (n + tile - 1) / tile;
  const int64_t tasks = side * side;
  const int64_t threads = (tasks + 31) / 32 * 32;
  return static_cast<int>(threads < kMaxThreads ? threads : kMaxThreads);
}

template <bool kFrechet, typename In>
using KernelFn = void (*)(const In*, const In*, In*, int64_t, int64_t);

template <bool kFrechet, typename In>
KernelFn<kFrechet, In> shared_kernel(int tile) {
  switch (tile) {
    case 1: return expm_shared_kernel<kFrechet, In, 1>;
    case 2: return expm_shared_kernel<kFrechet, In, 2>;
    default: return expm_shared_kernel<kFrechet, In, 4>;
  }
}

// False when a CUDA call failed; its error is left for the caller's cudaGetLastError().
template <bool kFrechet, typename In>
bool configure(const ExpmParams& p, Config& cfg) {
  using Acc = AccT<In>;
  int device = 0, optin = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return false;
  if (cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) !=
      cudaSuccess) {
    return false;
  }
  cfg.smem_optin = optin;
  const int64_t nn = p.n * p.n;
  if (p.n <= kMaxSharedN) {
    cfg.tile = shared_tile(p.n);
    cfg.threads = shared_threads(p.n, cfg.tile);
    const int64_t bytes = static_cast<int64_t>(cfg.threads) * sizeof(double) +
                          kWorkspaceSlots<kFrechet> * nn * static_cast<int64_t>(sizeof(Acc));
    if (bytes <= optin) {
      cfg.shared = true;
      cfg.smem = static_cast<size_t>(bytes);
      cfg.grid = p.batch < kMaxGrid ? p.batch : kMaxGrid;
      cfg.workspace = 0;
      return true;
    }
  }
  // Global workspace: one per block that can be resident at once (more blocks would only queue),
  // the grid looping over the matrices.
  int sms = 0, per_sm = 0;
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess ||
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, expm_global_kernel<kFrechet, In>,
                                                    kTileThreads, 0) != cudaSuccess) {
    return false;
  }
  const int64_t resident = static_cast<int64_t>(sms) * (per_sm > 0 ? per_sm : 1);
  cfg.shared = false;
  cfg.threads = kTileThreads;
  cfg.grid = p.batch < resident ? p.batch : resident;
  cfg.smem = 0;
  cfg.workspace =
      cfg.grid * kWorkspaceSlots<kFrechet> * nn * static_cast<int64_t>(sizeof(Acc));
  return true;
}

template <bool kFrechet, typename In>
void launch(const ExpmParams& p, cudaStream_t stream) {
  using Acc = AccT<In>;
  Config cfg;
  if (!configure<kFrechet, In>(p, cfg)) return;
  const In* a = static_cast<const In*>(p.a);
  const In* g = static_cast<const In*>(p.direction);
  In* out = static_cast<In*>(p.out);
  const unsigned grid = static_cast<unsigned>(cfg.grid);
  if (cfg.shared) {
    const KernelFn<kFrechet, In> kernel = shared_kernel<kFrechet, In>(cfg.tile);
    // The kernel's limit is raised to the device maximum, not to this call's size: another host
    // thread launching the same kernel for a larger n cannot lower it under this launch.
    if (cfg.smem > static_cast<size_t>(kDefaultSmem) &&
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             cfg.smem_optin) != cudaSuccess) {
      return;
    }
    kernel<<<grid, cfg.threads, cfg.smem, stream>>>(a, g, out, p.batch, p.n);
  } else {
    // p.workspace holds expm_cuda_workspace_bytes(p) bytes (allocated by the caller).
    expm_global_kernel<kFrechet, In><<<grid, kTileThreads, 0, stream>>>(
        a, g, out, p.batch, p.n, static_cast<Acc*>(p.workspace));
  }
}

template <typename In>
void dispatch(const ExpmParams& p, cudaStream_t stream) {
  if (p.direction == nullptr) {
    launch<false, In>(p, stream);
  } else {
    launch<true, In>(p, stream);
  }
}

template <typename In>
int64_t workspace_bytes(const ExpmParams& p) {
  Config cfg;
  const bool ok = p.direction == nullptr ? configure<false, In>(p, cfg) : configure<true, In>(p, cfg);
  // On a failed query expm_cuda fails the same way and launches nothing.
  return ok ? cfg.workspace : 0;
}

}  // namespace

void expm_cuda(const ExpmParams& p, cudaStream_t stream) {
  if (p.batch <= 0 || p.n <= 0) return;
  switch (p.dtype) {
    case DType::kFloat32: dispatch<float>(p, stream); break;
    case DType::kFloat64: dispatch<double>(p, stream); break;
    case DType::kFloat16: dispatch<__half>(p, stream); break;
    case DType::kBFloat16: dispatch<__nv_bfloat16>(p, stream); break;
  }
}

int64_t expm_cuda_workspace_bytes(const ExpmParams& p) {
  if (p.batch <= 0 || p.n <= 0) return 0;
  switch (p.dtype) {
    case DType::kFloat32: return workspace_bytes<float>(p);
    case DType::kFloat64: return workspace_bytes<double>(p);
    case DType::kFloat16: return workspace_bytes<__half>(p);
    case DType::kBFloat16: return workspace_bytes<__nv_bfloat16>(p);
  }
  return 0;
}

}  // namespace peft_kernels
