// Torch-facing entry points of the batched matrix exponential (csrc/kernels/expm.h).
#include "ops/expm.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <vector>

#include "kernels/expm.h"
#include "ops/common.h"

namespace peft_kernels {
namespace {

constexpr const char* kOp = "expm";

// From this size on, batched GEMMs (expm_batched) beat the per-matrix kernels: on the CPU
// (threaded BLAS) against one-matrix-per-thread loops, and on CUDA against one block per matrix,
// which measured 0.27x torch.linalg.matrix_exp's cuBLAS products forward and 0.24x
// forward+backward at (8, 256, 256) float32 on an H200 (8 blocks on 132 SMs).
constexpr int64_t kBlasMinN = 128;

// expm::taylor's Ops over whole batches: slot k holds [batch, n, n] (and its derivative), products
// are batched GEMMs (cuBLAS on CUDA), combinations elementwise.
struct BatchedOps {
  std::array<at::Tensor, expm::kSlots> X, L;
  bool frechet = false;

  void product(int z, int x, int y) {
    X[z] = at::bmm(X[x], X[y]);
    if (frechet) L[z] = at::bmm(L[x], X[y]).baddbmm_(X[x], L[y]);
  }
  void combine(int z, double cI, expm::Term<double> t0, expm::Term<double> t1,
               expm::Term<double> t2 = expm::none<double>(),
               expm::Term<double> t3 = expm::none<double>(),
               expm::Term<double> t4 = expm::none<double>()) {
    const expm::Term<double> terms[5] = {t0, t1, t2, t3, t4};
    auto sum = [&](const std::array<at::Tensor, expm::kSlots>& slots) {
      at::Tensor acc = slots[t0.slot] * t0.c;  // a new tensor: a term may read slot z itself
      for (int k = 1; k < 5; ++k) {
        if (terms[k].slot >= 0) acc.add_(slots[terms[k].slot], terms[k].c);
      }
      return acc;
    };
    at::Tensor x = sum(X);
    if (cI != 0.0) x.diagonal(0, -2, -1).add_(cI);
    at::Tensor l = frechet ? sum(L) : at::Tensor();
    X[z] = x;
    if (frechet) L[z] = l;
  }
};

// ||X||_1 of every matrix of [batch, n, n], in float64; NaN anywhere in a matrix gives NaN.
at::Tensor batched_norm1(const at::Tensor& X) {
  return at::amax(at::sum(X.abs(), {-2}, false, at::kDouble), {-1});
}

}  // namespace

// exp (or with grad the adjoint Frechet derivative L(A^T, G)) of a batch through batched
// products, for n >= kBlasMinN on both devices. One block per matrix measured 0.27x
// torch.linalg.matrix_exp on CUDA there (8 blocks on 132 SMs of an H200), and one matrix at a
// time through BLAS products up to 2.8x slower than this on the CPU (32 x 128^2 float32 at
// norm 1). ATen itself squares matrix by matrix (a host sync and s_i single-matrix products
// each) and differentiates through the 2n x 2n block exponential.
//
// Every matrix gets its own squarings s_i from the same eta as the kernels (its 1-norm, or
// max(||A^2||^(1/2), ||A^3||^(1/3)) when smaller); the batch shares its products, so it shares
// the degree: the highest that one of its matrices needs (degrees 1..8 from the norms alone, or
// 12 / 18). The squarings run as s_max batched products, a matrix keeping its value once its own
// s_i are done. Host syncs: the norms, then (for degree 12 / 18) the s_i, which give the loop and
// exact 2^-s factors. The derivative rides along every product (three GEMMs per product, the
// kernels' scheme) in the working precision: 3/8 of the block form's flops, at n instead of 2n.
// A matrix with a NaN or Inf in A is evaluated as zero and its result set to NaN; an Inf in G
// propagates (the result is not finite). Half types are computed in float32.
at::Tensor expm_batched(const at::Tensor& A_in, const c10::optional<at::Tensor>& grad_in) {
  TORCH_CHECK_VALUE(A_in.dim() >= 2 && A_in.size(-1) == A_in.size(-2), kOp,
                    ": A must be a batch of square matrices [..., n, n], got shape ",
                    shape_str(A_in));
  check_floating_input(kOp, "A", A_in);
  if (grad_in.has_value()) {
    check_like(kOp, "grad", *grad_in, A_in, "A");
    TORCH_CHECK_VALUE(grad_in->sizes() == A_in.sizes(), kOp, ": grad must have A's shape ",
                      shape_str(A_in), ", got ", shape_str(*grad_in));
  }
  const auto dtype = A_in.scalar_type();
  const auto work = dtype == at::kDouble ? at::kDouble : at::kFloat;
  const bool frechet = grad_in.has_value();
  const int64_t n = A_in.size(-1);
  if (A_in.numel() == 0) return at::empty_like(A_in, at::MemoryFormat::Contiguous);
  const int64_t batch = A_in.numel() / (n * n);
  using expm::A;
  using expm::A2;
  using expm::A3;

  at::Tensor X0 = A_in.reshape({batch, n, n}).to(work);
  if (frechet) X0 = X0.mT();
  X0 = X0.contiguous();
  const at::Tensor norm = batched_norm1(X0);
  const at::Tensor norm_host = norm.cpu();
  const auto nh = norm_host.accessor<double, 1>();
  bool any_bad = false, any_zero = false;
  for (int64_t b = 0; b < batch; ++b) {
    any_bad = any_bad || !(nh[b] <= expm::kMaxFinite);
    any_zero = any_zero || nh[b] == 0;
  }
  // The matrices to evaluate as zero and return as NaN; no mask work when every one is finite.
  const at::Tensor bad3 =
      any_bad ? norm.isfinite().logical_not().view({batch, 1, 1}) : at::Tensor();
  BatchedOps ops;  // its products and combinations make new tensors: slot A may alias the input
  ops.frechet = frechet;
  ops.X[A] = any_bad ? X0.masked_fill(bad3, 0) : X0;
  if (frechet) ops.L[A] = grad_in->reshape({batch, n, n}).to(work).contiguous();
  const bool dbl = work == at::kDouble;
  const at::Tensor direction = frechet ? ops.L[A] : at::Tensor();
  auto finish = [&](int result) {
    at::Tensor out = frechet ? ops.L[result] : ops.X[result];
    if (any_bad) out = out.masked_fill(bad3, std::numeric_limits<double>::quiet_NaN());
    if (any_zero) {
      // exp(0) = I and L(0, G) = G exactly, as the kernels give them: the shared degree's
      // coefficients need not sum to exactly 1 (degree 12's give 1 - 2^-53 in float64).
      const at::Tensor zero = (norm == 0).view({batch, 1, 1});
      out = at::where(zero, frechet ? direction : at::eye(n, out.options()), out);
    }
    return out.to(dtype).reshape(A_in.sizes()).contiguous();
  };

  // Degrees 1..8 when every matrix's norm allows one (the batch takes the highest of them).
  int low = 0;
  for (int64_t b = 0; b < batch && low >= 0; ++b) {
    if (!(nh[b] <= expm::kMaxFinite)) continue;  // evaluated as zero, any degree does
    const int index = expm::cheapest_degree(nh[b], expm::kNumDegrees - 2, dbl);
    low = index < 0 ? -1 : std::max(low, index);
  }
  if (low >= 0) return finish(expm::taylor<double>(ops, expm::taylor_degree(low)));

  ops.product(A2, A, A);
  ops.product(A3, A, A2);
  // Each matrix's degree and squarings by the kernels' own rule; a non-finite matrix was zeroed.
  const at::Tensor norms =
      at::stack({any_bad ? norm.masked_fill(bad3.view({batch}), 0) : norm,
                 batched_norm1(ops.X[A2]), batched_norm1(ops.X[A3])})
          .cpu();
  const auto nm = norms.accessor<double, 2>();
  std::vector<int64_t> squarings(batch);
  int64_t s_max = 0;
  bool reform = false, degree18 = false;
  for (int64_t b = 0; b < batch; ++b) {
    const expm::HighDegreeScaling scaling =
        expm::high_degree_scaling(nm[0][b], nm[1][b], nm[2][b], dbl);
    squarings[b] = scaling.squarings;
    s_max = std::max<int64_t>(s_max, scaling.squarings);
    reform = reform || (scaling.squarings > 0 && !scaling.powers_finite);
    degree18 = degree18 || scaling.degree_index == expm::kNumDegrees - 1;
  }
  if (s_max > 0) {
    // (2^-s A)^k = 2^-ks A^k, by k multiplications with f = 2^-s (exact: the 1-norm of a finite
    // matrix bounds s to where the working type still holds 2^-s, subnormals included). One
    // product by 2^-ks could underflow where the scaled power does not.
    at::Tensor f = at::empty({batch, 1, 1}, at::TensorOptions().dtype(at::kDouble));
    auto fa = f.accessor<double, 3>();
    for (int64_t b = 0; b < batch; ++b) {
      fa[b][0][0] = std::ldexp(1.0, -static_cast<int>(squarings[b]));
    }
    f = f.to(X0.device(), work);
    const int slots[3] = {A, A2, A3};
    for (int k = 0; k < (reform ? 1 : 3); ++k) {
      for (int times = 0; times <= k; ++times) {
        ops.X[slots[k]] = ops.X[slots[k]] * f;
        if (frechet) ops.L[slots[k]] = ops.L[slots[k]] * f;
      }
    }
    if (reform) {  // a power overflowed: form them again from the scaled A (as the kernels do)
      ops.product(A2, A, A);
      ops.product(A3, A, A2);
    }
  }
  int result = expm::taylor<double>(ops, degree18 ? 18 : 12);
  const at::Tensor squarings_dev =
      s_max > 0 ? at::tensor(squarings).to(X0.device()) : at::Tensor();
  for (int64_t j = 0; j < s_max; ++j) {
    int64_t active = 0;
    for (int64_t b = 0; b < batch; ++b) active += squarings[b] > j;
    at::Tensor sq = at::bmm(ops.X[result], ops.X[result]);
    at::Tensor lsq;
    if (frechet) {
      lsq = at::bmm(ops.L[result], ops.X[result]).baddbmm_(ops.X[result], ops.L[result]);
    }
    if (active < batch) {  // a matrix whose own squarings are done keeps its value
      const at::Tensor more = (squarings_dev > j).view({batch, 1, 1});
      sq = at::where(more, sq, ops.X[result]);
      if (frechet) lsq = at::where(more, lsq, ops.L[result]);
    }
    ops.X[result] = sq;
    if (frechet) ops.L[result] = lsq;
  }
  return finish(result);
}

namespace {

void check_square(const at::Tensor& A) {
  TORCH_CHECK_VALUE(A.dim() >= 2 && A.size(-1) == A.size(-2), kOp,
                    ": A must be a batch of square matrices [..., n, n], got shape ", shape_str(A));
  check_floating_input(kOp, "A", A);
}

at::Tensor run(const at::Tensor& A_in, const at::Tensor* grad_in) {
  const int64_t n = A_in.size(-1);
  if (n >= kBlasMinN) {
    return expm_batched(A_in, grad_in != nullptr ? c10::optional<at::Tensor>(*grad_in)
                                                 : c10::nullopt);
  }
  const at::Tensor A = A_in.contiguous();
  at::Tensor grad;
  if (grad_in != nullptr) grad = grad_in->contiguous();
  at::Tensor out = at::empty_like(A, at::MemoryFormat::Contiguous);
  if (out.numel() == 0) return out;
  ExpmParams p;
  p.dtype = kernel_dtype(A.scalar_type());
  p.batch = A.numel() / (n * n);
  p.n = n;
  p.a = A.const_data_ptr();
  p.direction = grad_in != nullptr ? grad.const_data_ptr() : nullptr;
  p.out = out.mutable_data_ptr();
  if (A.is_cuda()) {
    PK_CUDA_LAUNCH(A, with_cuda_workspace(A, [&] { return expm_cuda_workspace_bytes(p); },
                                          [&](void* ws, cudaStream_t st) {
                                            p.workspace = ws;
                                            expm_cuda(p, st);
                                          }));
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
