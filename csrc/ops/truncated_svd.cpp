// Torch-facing entry point of the batched truncated SVD (csrc/kernels/truncated_svd.h). The
// kernels do the parts no library batches well: the Jacobi sweeps and the orthonormalisation of
// many thin matrices. Products and the QR that reduces a tall matrix to its square triangle go
// through ATen (MKL/LAPACK, cuBLAS/cuSOLVER).
#include "ops/truncated_svd.h"

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "kernels/truncated_svd.h"
#include "ops/common.h"

namespace peft_kernels {
namespace {

constexpr const char* kOp = "truncated_svd";
// Cyclic Jacobi converges quadratically once the off-diagonal mass is small; 6 to 12 sweeps is
// typical, so this bound is only reached by a matrix that does not converge.
constexpr int kMaxSweeps = 40;
// The range finder's test matrix comes from this seed, so results are reproducible and a matrix
// gives the same answer in any batch.
constexpr uint64_t kSketchSeed = 0x5eed5eedULL;

// Runs the Jacobi kernel in place on X [b, n, m] (columns as rows, m >= n); returns V's columns
// as rows [b, n, n] and, if wanted, each matrix's sweep count or status.
at::Tensor jacobi(at::Tensor& X, at::Tensor* sweeps_out = nullptr) {
  TORCH_INTERNAL_ASSERT(X.is_contiguous(), "truncated_svd: the Jacobi kernel needs dense rows");
  const int64_t b = X.size(0), n = X.size(1), m = X.size(2);
  at::Tensor V = at::empty({b, n, n}, X.options());
  // n = 0 runs no kernel: nothing to sweep.
  at::Tensor sweeps = n == 0 ? at::zeros({b}, X.options().dtype(at::kInt))
                             : at::empty({b}, X.options().dtype(at::kInt));
  const bool is_double = X.scalar_type() == at::kDouble;
  const double eps = is_double ? std::numeric_limits<double>::epsilon()
                               : std::numeric_limits<float>::epsilon();
  // Columns whose norm falls to eps^2 |X|_F are zero (svd::negligible); the smallest normal
  // number as a floor keeps the squared norms that the test compares out of the subnormals.
  const double min_normal = is_double ? std::numeric_limits<double>::min()
                                      : static_cast<double>(std::numeric_limits<float>::min());
  const at::Tensor negligible =
      at::linalg_vector_norm(X, 2, {1, 2}, /*keepdim=*/false, at::kDouble)
          .square_()
          .mul_(eps * eps * eps * eps)
          .clamp_min_(min_normal);
  JacobiSvdParams p;
  p.x = X.mutable_data_ptr();
  p.v = V.mutable_data_ptr();
  p.sweeps = sweeps.mutable_data_ptr<int32_t>();
  p.batch = b;
  p.m = m;
  p.n = n;
  p.max_sweeps = kMaxSweeps;
  p.tol = eps * std::sqrt(static_cast<double>(m));
  p.negligible = negligible.const_data_ptr<double>();
  p.dtype = kernel_dtype(X.scalar_type());
  if (X.is_cuda()) {
    PK_CUDA_LAUNCH(X, jacobi_svd_cuda(p, current_stream(X)));
  } else {
    jacobi_svd_cpu(p);
  }
  if (sweeps_out != nullptr) *sweeps_out = sweeps;
  const int64_t failed = (sweeps == svd::kNotConverged).sum().item<int64_t>();
  if (failed > 0) {
    TORCH_WARN(kOp, ": ", failed, " of ", b, " matrices did not converge in ", kMaxSweeps,
               " Jacobi sweeps; their singular values are accurate only to the last sweep's "
               "orthogonality");
  }
  return V;
}

// Orthonormalises the rows of Q [b, l, m] in place, in order.
void orthonormalize(at::Tensor& Q) {
  TORCH_INTERNAL_ASSERT(Q.is_contiguous(), "truncated_svd: orthonormalize needs dense rows");
  OrthonormalizeParams p;
  p.q = Q.mutable_data_ptr();
  p.batch = Q.size(0);
  p.l = Q.size(1);
  p.m = Q.size(2);
  p.dtype = kernel_dtype(Q.scalar_type());
  if (Q.is_cuda()) {
    PK_CUDA_LAUNCH(Q, orthonormalize_cuda(p, current_stream(Q)));
  } else {
    orthonormalize_cpu(p);
  }
}

// Rows order[i, j] of X[i] for every i: X [b, n, m], order [b, k] -> [b, k, m]. Row copies through
// index_select: gather with the index expanded over m measured 140 us against 21-29 us at
// (8, 64, 64) on the CPU.
at::Tensor select_rows(const at::Tensor& X, const at::Tensor& order) {
  const int64_t b = X.size(0), n = X.size(1), m = X.size(2), k = order.size(1);
  const at::Tensor offsets = at::arange(b, order.options()).mul_(n).unsqueeze(-1);
  const at::Tensor flat = (order + offsets).view({-1});
  return X.contiguous().view({b * n, m}).index_select(0, flat).view({b, k, m});
}

struct Triplets {
  at::Tensor Ut, S, Vh;  // U's columns as rows [b, k, m], S [b, k], Vh [b, k, n]
};

// Top-k of the SVD of C [b, M, N], M >= N. Square: Jacobi on C itself, C Z = W S, so U = W
// (the rotated columns, normalised) and V = Z (the accumulated rotations). Tall: C = Q R first,
// and Jacobi on R^T (R's rows as the vectors): R^T Z = W S gives C = (Q Z) S W^T, U = Q Z and
// V = W. On R^T rather than R, because QR leaves R's row norms graded like the singular
// values, which one-sided Jacobi converges fastest on (Drmac and Veselic 2008). Sweeps at 256 x 64
// float32, s_i = exp(-i/8): 8-9 on R^T against 13-15 on R (512 x 128: 9-11 against 23-25);
// s_i = 1/i: 8-10 against 9-12. Errors equal or smaller, graded matrices included.
// The columns that come from W S are completed to an orthonormal set where S is zero.
Triplets svd_tall(const at::Tensor& C, int64_t k) {
  const int64_t M = C.size(1), N = C.size(2);
  at::Tensor Q, X;
  if (M > N) {
    auto qr = at::linalg_qr(C, "reduced");
    Q = std::get<0>(qr);
    X = std::get<1>(qr).contiguous();  // R's rows: Jacobi on R^T
  } else {
    // C's columns as rows; a clone, as Jacobi works in place and for 1 x 1 matrices the
    // transpose is already contiguous (X would be the caller's tensor).
    X = C.transpose(1, 2).clone(at::MemoryFormat::Contiguous);
  }
  // float32: every rotation rounds the columns again, and after the ~10 sweeps of a 64 x 64 matrix
  // their norms (S) measured 7.6e-6 off relative to S_max (LAPACK's float32 SVD: 1.2e-7). The
  // rotated columns A v_j are formed once more from the unrotated ones in float64 instead:
  // |A v_j| / |v_j| is off only to second order in V's orthogonality error, and S then carries
  // float32's own rounding (6e-8). It costs one n x n x m float64 product against the ~60 n^2 m
  // float32 flops of the sweeps.
  const bool refine = X.scalar_type() == at::kFloat;
  const at::Tensor X0 = refine ? X.to(at::kDouble) : at::Tensor();
  at::Tensor Z = jacobi(X);  // Z's columns as rows
  at::Tensor cols = X;
  if (refine) {
    at::Tensor Zd = Z.to(at::kDouble);
    Zd.div_(at::linalg_vector_norm(Zd, 2, {-1}, /*keepdim=*/true));
    Z = Zd.to(at::kFloat);
    cols = at::matmul(Zd, X0);
  }
  const at::Tensor norms = at::linalg_vector_norm(cols, 2, {-1});
  const at::Tensor order = std::get<1>(norms.sort(/*stable=*/true, -1, /*descending=*/true))
                               .narrow(-1, 0, k);
  const at::Tensor S = norms.gather(-1, order);
  const at::Tensor S_safe = at::where(S > 0, S, at::ones_like(S)).unsqueeze(-1);
  at::Tensor W = (select_rows(cols, order) / S_safe).to(X.scalar_type()).contiguous();
  orthonormalize(W);  // zero columns get orthonormal completions; the rest are already unit
  const at::Tensor Zk = select_rows(Z, order);
  if (Q.defined()) return {at::matmul(Zk, Q.transpose(1, 2)), S.to(X.scalar_type()), W};
  return {W, S.to(X.scalar_type()), Zk};
}

// The range finder's test matrix Omega [N, l], the same for every matrix and every call.
at::Tensor sketch(int64_t N, int64_t l, const at::TensorOptions& options) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(kSketchSeed);
  return at::randn({N, l}, gen, at::TensorOptions().dtype(at::kDouble)).to(options);
}

// Halko, Martinsson and Tropp (2011), Algorithm 4.4: the range of C [b, M, N] (M >= N) from
// C Omega with Omega [N, l], l = k + oversample, niter subspace iterations with
// orthonormalisation after every product, then the exact method on the l x N projection Q^T C.
Triplets svd_randomized(const at::Tensor& C, int64_t k, int64_t niter, const at::Tensor& omega) {
  const at::Tensor Ct = C.transpose(1, 2);
  at::Tensor Qt = at::matmul(omega.t(), Ct).contiguous();  // (C Omega)^T [b, l, M]
  orthonormalize(Qt);
  for (int64_t i = 0; i < niter; ++i) {
    at::Tensor Zt = at::matmul(Qt, C).contiguous();  // (C^T Q)^T [b, l, N]
    orthonormalize(Zt);
    Qt = at::matmul(Zt, Ct).contiguous();
    orthonormalize(Qt);
  }
  // B = Q^T C [b, l, N] is wide. Its rows are reduced with the same in-kernel orthonormalisation
  // (B = R P, P's rows orthonormal, R = B P^T [b, l, l]) rather than a per-matrix Householder
  // QR, then R = U_r S Vh_r by Jacobi: C ~ Q B = (Q U_r) S (Vh_r P).
  const at::Tensor B = at::matmul(Qt, C);
  at::Tensor P = B.clone(at::MemoryFormat::Contiguous);
  orthonormalize(P);
  const Triplets t = svd_tall(at::matmul(B, P.transpose(1, 2)), k);
  return {at::matmul(t.Ut, Qt), t.S, at::matmul(t.Vh, P)};
}

// Matrices per call of the randomized method on the CPU. Its 2 niter + 2 passes over each matrix
// stream the whole batch from memory when run on all of it at once; a chunk of at most ~16 MiB
// (and a multiple of the thread count, so each thread has whole matrices) is still in the
// last-level cache for the passes after the first. Float32, k = 8-32, on a 2-core EPYC with a
// 32 MiB L3 (median ms, with not copying a wide A's transpose): (64, 256, 512) 38 -> 19.7,
// (36, 768, 768) 54 -> 42, (12, 1024, 1024) 56 -> 52 (compute-bound passes), (16, 512, 1024)
// 47 -> 24. Chunks of 4 and 24 MiB measured no better.
int64_t randomized_chunk(int64_t batch, int64_t matrix_bytes) {
  constexpr int64_t kChunkBytes = int64_t{16} << 20;
  const int64_t threads = std::max(1, at::get_num_threads());
  return std::min(batch, std::max<int64_t>(1, kChunkBytes / matrix_bytes / threads) * threads);
}

// Matrices per call otherwise: the working copies (the float32 copy of a half-precision batch,
// the exact method's contiguous and refinement copies) stay within ~1 GiB however large the
// batch (PiSSA on a 7B model: 17 GiB of float32 MLP weights), in chunks that still fill a GPU.
int64_t work_chunk(int64_t batch, int64_t matrix_bytes) {
  constexpr int64_t kChunkBytes = int64_t{1} << 30;
  return std::min(batch, std::max<int64_t>(1, kChunkBytes / std::max<int64_t>(1, matrix_bytes)));
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> jacobi_svd_columns(const at::Tensor& X) {
  check_floating_input(kOp, "X", X);
  TORCH_CHECK_VALUE(X.dim() == 3 && X.size(1) <= X.size(2), kOp,
                    ": X must be [batch, n, m] with n <= m, got ", shape_str(X));
  TORCH_CHECK_TYPE(X.scalar_type() == at::kFloat || X.scalar_type() == at::kDouble, kOp,
                   ": the kernels take float32 or float64, got ", X.scalar_type());
  at::Tensor out = X.contiguous().clone(), sweeps;
  at::Tensor V = jacobi(out, &sweeps);
  return {out, V, sweeps};
}

at::Tensor orthonormalize_rows(const at::Tensor& Q) {
  check_floating_input(kOp, "Q", Q);
  TORCH_CHECK_VALUE(Q.dim() == 3 && Q.size(1) <= Q.size(2), kOp,
                    ": Q must be [batch, l, m] with l <= m, got ", shape_str(Q));
  TORCH_CHECK_TYPE(Q.scalar_type() == at::kFloat || Q.scalar_type() == at::kDouble, kOp,
                   ": the kernels take float32 or float64, got ", Q.scalar_type());
  at::Tensor out = Q.contiguous().clone();
  orthonormalize(out);
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> truncated_svd(const at::Tensor& A, int64_t k,
                                                              int64_t niter, int64_t oversample,
                                                              const std::string& method) {
  check_floating_input(kOp, "A", A);
  TORCH_CHECK_VALUE(A.dim() >= 2, kOp, ": A must be [..., m, n] (at least 2-D), got shape ",
                    shape_str(A));
  const int64_t m = A.size(-2), n = A.size(-1);
  TORCH_CHECK_VALUE(k >= 1 && k <= std::min(m, n), kOp, ": k must be in [1, min(m, n)] = [1, ",
                    std::min(m, n), "] for A of shape ", shape_str(A), ", got ", k);
  TORCH_CHECK_VALUE(method == "jacobi" || method == "randomized", kOp,
                    ": method must be 'jacobi' or 'randomized', got '", method, "'");
  TORCH_CHECK_VALUE(niter >= 0, kOp, ": niter must be >= 0, got ", niter);
  TORCH_CHECK_VALUE(oversample >= 0, kOp, ": oversample must be >= 0, got ", oversample);

  std::vector<int64_t> batch_shape(A.sizes().begin(), A.sizes().end() - 2);
  const int64_t batch = c10::multiply_integers(batch_shape);
  const auto dtype = A.scalar_type();
  const auto work = dtype == at::kDouble ? at::kDouble : at::kFloat;
  auto shaped = [&](const at::Tensor& t, int64_t rows, int64_t cols) {
    std::vector<int64_t> shape = batch_shape;
    shape.push_back(rows);
    if (cols >= 0) shape.push_back(cols);
    return t.to(dtype).reshape(shape).contiguous();
  };
  if (batch == 0) {
    const auto opts = A.options();
    return {shaped(at::empty({0, m, k}, opts), m, k), shaped(at::empty({0, k}, opts), k, -1),
            shaped(at::empty({0, k, n}, opts), k, n)};
  }
  const bool randomized = method == "randomized";
  const bool wide = m < n;
  const int64_t p = std::min(m, n);
  const at::Tensor omega =
      randomized ? sketch(p, std::min(k + oversample, p), A.options().dtype(work)) : at::Tensor();
  // On the CPU both methods' answer for a matrix does not depend on the batch around it, so
  // chunks change only where the work happens. (On CUDA torch's QR of tall inputs picks cuBLAS's
  // batched or cuSOLVER's kernel by batch size: the answers then agree to rounding.)
  const int64_t matrix_bytes = m * n * static_cast<int64_t>(at::elementSize(work));
  const int64_t chunk = randomized && !A.is_cuda() ? randomized_chunk(batch, matrix_bytes)
                                                   : work_chunk(batch, matrix_bytes);
  const at::Tensor A3 = A.reshape({batch, m, n});
  std::vector<at::Tensor> Us, Ss, Vhs;
  for (int64_t start = 0; start < batch; start += chunk) {
    const int64_t size = std::min(chunk, batch - start);
    // A matrix whose largest entry lies outside [lo, 1 / lo] is scaled to max |a_ij| = 1 (as
    // LAPACK does), so squared norms neither overflow nor underflow; S is scaled back. Others are
    // used as they are: scaling every matrix would copy the whole input. lo = 1e-15 in float64,
    // and 1e-6 in float32, where a column's squared norm must stay above the smallest normal
    // float (1.2e-38) down to eps^2 of the matrix's norm (see svd::negligible).
    at::Tensor part = A3.narrow(0, start, size).to(work);
    // max |a_ij| as max(amax, -amin): two plain reductions run at memory speed, where the
    // inf-norm (and aminmax) reductions take ~10x longer on CPU (35 ms against 6 ms at
    // 36 x 768 x 768).
    const at::Tensor amax = at::maximum(at::amax(part, {1, 2}, /*keepdim=*/true),
                                        -at::amin(part, {1, 2}, /*keepdim=*/true));
    const double lo = work == at::kDouble ? 1e-15 : 1e-6;
    const at::Tensor extreme = amax.isfinite() & (amax > 0) & ((amax < lo) | (amax > 1.0 / lo));
    const at::Tensor scale = at::where(extreme, amax, at::ones_like(amax));
    if (extreme.any().item<bool>()) part = part / scale;
    const at::Tensor C = wide ? part.transpose(1, 2) : part;  // tall: M >= N
    // The randomized method only multiplies by C and C^T, which BLAS reads in either layout.
    const Triplets t = randomized ? svd_randomized(C, k, niter, omega)
                                  : svd_tall(C.contiguous(), k);
    // Rows of U^T and Vh; for a wide A they trade places.
    at::Tensor Ut = wide ? t.Vh : t.Ut, Vh = wide ? t.Ut : t.Vh;
    // Sign convention: the largest-magnitude entry of each column of U is positive.
    const at::Tensor pivot = Ut.abs().argmax(-1, /*keepdim=*/true);
    const at::Tensor sign = at::where(Ut.gather(-1, pivot) < 0, -1.0, 1.0).to(work);
    Us.push_back((Ut * sign).transpose(1, 2));
    Ss.push_back(t.S * scale.view({size, 1}));
    Vhs.push_back(Vh * sign);
  }
  auto joined = [](const std::vector<at::Tensor>& parts) {
    return parts.size() == 1 ? parts[0] : at::cat(parts);
  };
  return {shaped(joined(Us), m, k), shaped(joined(Ss), k, -1), shaped(joined(Vhs), k, n)};
}

}  // namespace peft_kernels
