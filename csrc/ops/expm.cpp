// Torch-facing entry points of the batched matrix exponential (csrc/kernels/expm.h).
#include "ops/expm.h"

#include <limits>
#include <vector>

#include "kernels/expm.h"
#include "ops/common.h"

namespace peft_kernels {
namespace {

constexpr const char* kOp = "expm";

// From this size on, one matrix's products are big enough for BLAS to beat the per-matrix
// kernels: on the CPU (threaded inside each product) against one-matrix-per-thread loops, and on
// CUDA against one-block-per-matrix, which measured 0.27x torch.linalg.matrix_exp's cuBLAS
// products forward and 0.24x forward+backward at (8, 256, 256) float32 on an H200 (8 blocks on
// 132 SMs).
constexpr int64_t kBlasMinN = 128;

// CUDA, n >= kBlasMinN: ATen's batched cuBLAS evaluation, and for the backward the adjoint Frechet
// derivative as the upper-right block of exp([[A^H, G], [0, A^H]]), evaluated in float64: in
// float32 the block form measured 1.4e-5 to 6.7e-5 relative (1-norm) off the float64 reference at
// n = 256, against the 1e-5 the per-matrix kernel keeps; float64 GEMMs run on the H200's FP64
// tensor cores at about float32's SIMT rate.
//
// A matrix with an Inf (in A, or in G for the backward) is zeroed before it reaches ATen and its
// result set to NaN afterwards: ATen's squaring count ceil(log2(norm / theta)) converts an
// infinite norm to INT64_MAX on CUDA and queues that many products (the call never returns). No
// host sync: the mask stays on the device.
at::Tensor expm_cuda_blas(const at::Tensor& A, const at::Tensor* grad) {
  const auto nonfinite = [](const at::Tensor& t) {
    return t.isfinite().logical_not().any(-1).any(-1).unsqueeze(-1).unsqueeze(-1);
  };
  at::Tensor bad = nonfinite(A);
  if (grad != nullptr) bad = bad.logical_or(nonfinite(*grad));
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const at::Tensor As = A.masked_fill(bad, 0);
  if (grad == nullptr) {
    const at::Tensor A32 = As.scalar_type() == at::kDouble ? As : As.to(at::kFloat);
    return at::linalg_matrix_exp(A32).masked_fill(bad, nan).to(A.scalar_type()).contiguous();
  }
  const int64_t n = A.size(-1);
  std::vector<int64_t> big(A.sizes().begin(), A.sizes().end());
  big[big.size() - 1] = big[big.size() - 2] = 2 * n;
  at::Tensor M = at::zeros(big, A.options().dtype(at::kDouble));
  const at::Tensor AH = As.mT();
  M.narrow(-2, 0, n).narrow(-1, 0, n).copy_(AH);
  M.narrow(-2, n, n).narrow(-1, n, n).copy_(AH);
  M.narrow(-2, 0, n).narrow(-1, n, n).copy_(grad->masked_fill(bad, 0));
  // The upper-right block of the 2n x 2n result is a strided view: the op returns contiguous
  // tensors (as its fake kernel says), whatever the dtype.
  return at::linalg_matrix_exp(M)
      .narrow(-2, 0, n)
      .narrow(-1, n, n)
      .masked_fill(bad, nan)
      .to(A.scalar_type())
      .contiguous();
}

void check_square(const at::Tensor& A) {
  TORCH_CHECK_VALUE(A.dim() >= 2 && A.size(-1) == A.size(-2), kOp,
                    ": A must be a batch of square matrices [..., n, n], got shape ", shape_str(A));
  check_floating_input(kOp, "A", A);
}

// Products through at::mm (MKL/OpenBLAS) for large n; every matrix still gets its own degree
// and squarings. Matrices go one after another: BLAS threads inside each product.
template <typename T>
struct BlasBackend {
  int64_t n;
  at::TensorOptions options;

  int64_t first() const { return 0; }
  int64_t stride() const { return 1; }
  void sync() const {}
  double norm1(const T* X) const { return expm::norm1_serial(X, n); }
  void gemm(T* Z, const T* X, const T* Y, bool accumulate) const {
    at::Tensor z = at::from_blob(Z, {n, n}, options);
    const at::Tensor x = at::from_blob(const_cast<T*>(X), {n, n}, options);
    const at::Tensor y = at::from_blob(const_cast<T*>(Y), {n, n}, options);
    if (accumulate) {
      z.addmm_(x, y);
    } else {
      at::mm_out(z, x, y);
    }
  }
};

template <typename T>
void expm_cpu_blas(const at::Tensor& A, const at::Tensor* grad, at::Tensor& out) {
  const int64_t batch = A.numel() / (A.size(-1) * A.size(-1)), n = A.size(-1), nn = n * n;
  const bool frechet = grad != nullptr;
  BlasBackend<T> be{n, A.options()};
  std::vector<T> workspace(static_cast<size_t>((frechet ? 2 : 1) * expm::kSlots * nn));
  T* ws = workspace.data();
  T* o = out.mutable_data_ptr<T>();
  for (int64_t b = 0; b < batch; ++b) {
    at::Tensor slot0 = at::from_blob(ws, {n, n}, A.options());
    if (!frechet) {
      slot0.copy_(A.view({batch, n, n})[b]);
      const int slot = expm::exp_in_workspace<false, T>(be, n, ws);
      std::copy(ws + slot * nn, ws + (slot + 1) * nn, o + b * nn);
    } else {
      slot0.copy_(A.view({batch, n, n})[b].t());
      std::copy(grad->const_data_ptr<T>() + b * nn, grad->const_data_ptr<T>() + (b + 1) * nn,
                ws + expm::kSlots * nn);
      const int slot = expm::exp_in_workspace<true, T>(be, n, ws);
      std::copy(ws + (expm::kSlots + slot) * nn, ws + (expm::kSlots + slot + 1) * nn, o + b * nn);
    }
  }
}

at::Tensor run(const at::Tensor& A_in, const at::Tensor* grad_in) {
  const at::Tensor A = A_in.contiguous();
  at::Tensor grad;
  if (grad_in != nullptr) grad = grad_in->contiguous();
  at::Tensor out = at::empty_like(A, at::MemoryFormat::Contiguous);
  const int64_t n = A.size(-1);
  if (out.numel() == 0) return out;
  ExpmParams p;
  p.dtype = kernel_dtype(A.scalar_type());
  p.batch = A.numel() / (n * n);
  p.n = n;
  p.a = A.const_data_ptr();
  p.direction = grad_in != nullptr ? grad.const_data_ptr() : nullptr;
  p.out = out.mutable_data_ptr();
  if (A.is_cuda() && n >= kBlasMinN) {
    out = expm_cuda_blas(A, grad_in != nullptr ? &grad : nullptr);
  } else if (A.is_cuda()) {
    PK_CUDA_LAUNCH(A, with_cuda_workspace(A, [&] { return expm_cuda_workspace_bytes(p); },
                                          [&](void* ws, cudaStream_t st) {
                                            p.workspace = ws;
                                            expm_cuda(p, st);
                                          }));
  } else if (n >= kBlasMinN) {
    const at::Tensor* g = grad_in != nullptr ? &grad : nullptr;
    if (A.scalar_type() == at::kDouble) {
      expm_cpu_blas<double>(A, g, out);
    } else {
      expm_cpu_blas<float>(A, g, out);
    }
  } else {
    expm_cpu(p);
  }
  return out;
}

}  // namespace

at::Tensor expm_fwd(const at::Tensor& A) {
  check_square(A);
  return run(A, nullptr);
}

at::Tensor expm_bwd(const at::Tensor& A, const at::Tensor& grad) {
  check_square(A);
  check_like(kOp, "grad", grad, A, "A");
  TORCH_CHECK_VALUE(grad.sizes() == A.sizes(), kOp, ": grad must have A's shape ", shape_str(A),
                    ", got ", shape_str(grad));
  return run(A, &grad);
}

}  // namespace peft_kernels
