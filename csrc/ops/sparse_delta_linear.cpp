// Torch-facing entry points of the sparse delta linear (csrc/kernels/sparse_delta_linear.h):
// argument and index validation, the CSR pattern, the dense GEMMs through ATen, and the choice
// between the sparse kernels and the dense path (one out x in temporary) by density.
#include "ops/sparse_delta_linear.h"

#include <deque>
#include <mutex>

#include "kernels/sparse_delta_linear.h"
#include "ops/common.h"

namespace peft_kernels {
namespace {

constexpr const char* kOp = "sparse_delta_linear";

// The sparse products (forward's x Delta^T, backward's dy Delta) cost two tile transpositions of
// the activations (N * (in + out) moves) plus N * nnz / 8 vector FMAs; adding Delta into a
// temporary copy of W costs ~2 passes over out * in and nothing per token. So, as lora_linear
// does, the products take W + Delta (one out x in temporary, never saved) when
// N * (in + out) >= 2 * out * in or the density reaches kDenseMatmulDensity, and the sparse
// kernels otherwise (small N: no out x in memory at all). Measured on CPU float32 at 1024 x 1024,
// N = 4096: the sparse product adds 4-7 ms to a 64-70 ms GEMM at 0.1-1%, the temporary ~1 ms.
constexpr double kDenseMatmulDensity = 0.05;
// dvalues: the SDDMM beats the dense dy^T x GEMM + gather below ~7% on CPU, float32, at every
// shape measured (dense time / SDDMM time at 5%, 7%, 10%, 15%: 1024 x 1024, N = 4096: 3.8, 1.3,
// 0.96, 0.68; N = 512: 1.8, 0.98, 0.18; 768 x 768, N = 12608: 4.2, 3.2, 2.2, 1.1; 1024 x 4096,
// N = 4096: 2.3, 1.7, 1.3, 0.8). Wider shapes would pay up to ~15%; one threshold keeps the
// choice simple and never slower. On CUDA the tile kernel stages
// G + W features per token for each G x W tile of Delta, and the tiles shrink as the density
// grows: at 4096 x 4096, N = 8192, bfloat16 that is ~0.8 GB of shared-memory staging at 1% and
// ~1.7 GB at 5%, against a ~0.4 ms tensor-core GEMM on an H100-class GPU. 2% is that traffic
// model's crossover, not yet a measurement.
constexpr double kDenseGradDensity = 0.07;
constexpr double kDenseGradDensityCuda = 0.02;

struct Pattern {
  at::Tensor row_ptr, rows, cols;  // int64 [out+1], int32 [nnz], int32 [nnz]
  at::Tensor col_ptr, col_order;   // the column view, built on demand
  at::Tensor flat;                 // int64 indices
  SparseDeltaPattern view(bool with_columns) const {
    SparseDeltaPattern p;
    p.nnz = flat.numel();
    p.row_ptr = row_ptr.const_data_ptr<int64_t>();
    p.rows = rows.const_data_ptr<int32_t>();
    p.cols = cols.const_data_ptr<int32_t>();
    if (with_columns) {
      p.col_ptr = col_ptr.const_data_ptr<int64_t>();
      p.col_order = col_order.const_data_ptr<int32_t>();
    }
    return p;
  }
};

struct Shapes {
  int64_t N, in, out, nnz;
};

Shapes check_inputs(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& indices,
                    const at::Tensor& values, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK_VALUE(x.dim() >= 1, kOp, ": x must have shape [..., in_features], got a 0-D tensor");
  check_floating_input(kOp, "x", x);
  check_dim(kOp, "weight", weight, 2, "[out_features, in_features]");
  check_like(kOp, "weight", weight, x, "x");
  const int64_t in = x.size(-1), out = weight.size(0);
  TORCH_CHECK_VALUE(weight.size(1) == in, kOp, ": weight must have shape [out_features, ", in,
                    "] to match x's last dimension, got ", shape_str(weight));
  TORCH_CHECK_VALUE(out < (int64_t{1} << 31) && in < (int64_t{1} << 31), kOp,
                    ": out_features and in_features must be < 2^31");
  TORCH_CHECK_VALUE(indices.device() == x.device(), kOp, ": indices is on ", indices.device(),
                    " but x is on ", x.device(), "; all tensors must be on one device");
  TORCH_CHECK_TYPE(indices.scalar_type() == at::kLong || indices.scalar_type() == at::kInt, kOp,
                   ": indices must be int64 or int32, got ", indices.scalar_type());
  check_dim(kOp, "indices", indices, 1, "[k] (flat row-major positions in weight)");
  check_like(kOp, "values", values, x, "x");
  check_dim(kOp, "values", values, 1, "[k]");
  TORCH_CHECK_VALUE(values.size(0) == indices.size(0), kOp, ": values must have one entry per index (",
                    indices.size(0), "), got ", shape_str(values));
  TORCH_CHECK_VALUE(indices.size(0) < (int64_t{1} << 31), kOp, ": at most 2^31 - 1 entries");
  if (bias.has_value()) {
    check_like(kOp, "bias", *bias, x, "x");
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == out, kOp, ": bias must have shape [", out,
                      "], got ", shape_str(*bias));
  }
  return {c10::multiply_integers(x.sizes().begin(), x.sizes().end() - 1), in, out, indices.size(0)};
}

// CUDA index tensors that passed validation. A layer passes the same index buffer every step, and
// on CUDA each validation is a stream sync (it measured 0.88x of the dense baseline's weight
// gradient before this cache). An entry holds while that very tensor is alive and unmodified: the
// same TensorImpl (the weak reference keeps its memory from being reused by another tensor), the
// same version counter (bumped by every in-place write), the same weight shape. A write that
// autograd does not see (through .data, or DLPack) keeps the version, so make_pattern also clamps
// cached indices into the matrix and makes them non-decreasing (a running maximum; duplicates
// are harmless to every kernel, and an unsorted column would take the CUDA kernels' windows
// outside their shared-memory tiles): such a write can give wrong values, never a read outside.
class ValidatedIndices {
 public:
  bool contains(const at::Tensor& indices, int64_t out, int64_t in) {
    if (indices.is_inference()) return false;  // no version counter to trust
    std::lock_guard<std::mutex> lock(mutex_);
    for (const Entry& e : entries_) {
      if (e.out == out && e.in == in && e.version == indices._version() &&
          e.impl.lock().get() == indices.unsafeGetTensorImpl()) {
        return true;
      }
    }
    return false;
  }
  void insert(const at::Tensor& indices, int64_t out, int64_t in) {
    if (indices.is_inference()) return;
    std::lock_guard<std::mutex> lock(mutex_);
    if (entries_.size() == kCapacity) entries_.pop_front();
    entries_.push_back(Entry{WeakImpl(indices.getIntrusivePtr()), indices._version(), out, in});
  }

 private:
  using WeakImpl = c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>;
  struct Entry {
    WeakImpl impl;
    int64_t version, out, in;
  };
  static constexpr size_t kCapacity = 256;  // a few per adapted layer of a large model
  std::mutex mutex_;
  std::deque<Entry> entries_;
};

ValidatedIndices& validated_indices() {
  static ValidatedIndices cache;
  return cache;
}

// Validates the indices (one device-to-host copy of two flags: on the CPU every call, as it
// costs two passes over k; on CUDA unless this tensor passed before) and builds the row view (and
// with with_columns the column view) that the sparse kernels read; the dense paths need neither.
Pattern make_pattern(const at::Tensor& indices, const Shapes& s, bool with_rows,
                     bool with_columns) {
  Pattern p;
  p.flat = indices.to(at::kLong).contiguous();
  const auto long_opts = p.flat.options();
  const bool cached = indices.is_cuda() && validated_indices().contains(indices, s.out, s.in);
  if (cached) {
    p.flat = std::get<0>(at::cummax(p.flat.clamp(0, s.out * s.in - 1), 0));  // ValidatedIndices
  } else if (s.nnz > 0) {
    const at::Tensor flags = at::stack({
        (p.flat.min() < 0).logical_or(p.flat.max() >= s.out * s.in),
        s.nnz > 1 ? (p.flat.slice(0, 1).le(p.flat.slice(0, 0, s.nnz - 1))).any()
                  : at::zeros({}, long_opts.dtype(at::kBool)),
    }).cpu();
    const bool* f = flags.const_data_ptr<bool>();
    TORCH_CHECK_VALUE(!f[0], kOp, ": indices must lie in [0, out_features * in_features) = [0, ",
                      s.out * s.in, ")");
    TORCH_CHECK_VALUE(!f[1], kOp, ": indices must be sorted in increasing order without duplicates");
    if (indices.is_cuda()) validated_indices().insert(indices, s.out, s.in);
  }
  if (!with_rows) return p;
  const at::Tensor rows64 = at::div(p.flat, s.in, "floor");
  p.rows = rows64.to(at::kInt);
  p.cols = (p.flat - rows64 * s.in).to(at::kInt);
  // Sorted indices: row r's entries start at the first index >= r * in.
  p.row_ptr = at::searchsorted(p.flat, at::arange(s.out + 1, long_opts) * s.in);
  if (with_columns) {
    // Stable: inside a column the entries stay in row order.
    const at::Tensor order = std::get<1>(at::sort(p.cols, /*stable=*/true, /*dim=*/0, false));
    p.col_order = order.to(at::kInt);
    p.col_ptr = at::searchsorted(p.cols.index_select(0, order).to(at::kLong),
                                 at::arange(s.in + 1, long_opts));
  }
  return p;
}

double density(const Shapes& s) {
  return static_cast<double>(s.nnz) / (static_cast<double>(s.out) * static_cast<double>(s.in));
}

bool dense_products(const Shapes& s) {
  const double weight_size = static_cast<double>(s.out) * static_cast<double>(s.in);
  return density(s) >= kDenseMatmulDensity ||
         static_cast<double>(s.N) * static_cast<double>(s.in + s.out) >= 2.0 * weight_size;
}

// W + Delta, one out x in temporary (the dense path).
at::Tensor dense_weight(const at::Tensor& weight, const Pattern& p, const at::Tensor& values) {
  at::Tensor w = weight.contiguous().clone();
  at::Tensor flat = w.view({-1});
  flat.index_put_({p.flat}, flat.index({p.flat}) + values);
  return w;
}

bool dense_grad(const Shapes& s, bool on_cuda) {
  return density(s) >= (on_cuda ? kDenseGradDensityCuda : kDenseGradDensity);
}

// y [N, dests] += src [N, sources] Delta^T (or Delta with transpose), in place.
void sparse_matmul(const at::Tensor& src, const Pattern& pat, const Shapes& s,
                   const at::Tensor& values, bool transpose, at::Tensor& y) {
  SparseDeltaMatmulParams mp;
  mp.dtype = kernel_dtype(src.scalar_type());
  mp.pattern = pat.view(transpose);
  mp.pattern.out = s.out;
  mp.pattern.in = s.in;
  mp.N = s.N;
  mp.values = values.const_data_ptr();
  mp.x = src.const_data_ptr();
  mp.y = y.mutable_data_ptr();
  mp.transpose = transpose;
  if (src.is_cuda()) {
    PK_CUDA_LAUNCH(src, with_cuda_workspace(
                            src, [&] { return sparse_delta_matmul_cuda_workspace_bytes(mp); },
                            [&](void* ws, cudaStream_t st) { sparse_delta_matmul_cuda(mp, ws, st); }));
  } else {
    sparse_delta_matmul_cpu(mp);
  }
}

// dvalues [nnz] = the entries of dy^T x.
void sparse_grad(const at::Tensor& dy, const at::Tensor& x2, const Pattern& pat, const Shapes& s,
                 at::Tensor& dvalues) {
  SparseDeltaGradParams gp;
  gp.dtype = kernel_dtype(x2.scalar_type());
  gp.pattern = pat.view(false);
  gp.pattern.out = s.out;
  gp.pattern.in = s.in;
  gp.N = s.N;
  gp.dy = dy.const_data_ptr();
  gp.x = x2.const_data_ptr();
  gp.dvalues = dvalues.mutable_data_ptr();
  if (x2.is_cuda()) {
    PK_CUDA_LAUNCH(x2, with_cuda_workspace(
                           x2, [&] { return sparse_delta_grad_cuda_workspace_bytes(gp); },
                           [&](void* ws, cudaStream_t st) { sparse_delta_grad_cuda(gp, ws, st); }));
  } else {
    sparse_delta_grad_cpu(gp);
  }
}

}  // namespace

at::Tensor sparse_delta_linear_fwd(const at::Tensor& x, const at::Tensor& weight,
                                   const at::Tensor& indices, const at::Tensor& values,
                                   const c10::optional<at::Tensor>& bias) {
  const Shapes s = check_inputs(x, weight, indices, values, bias);
  const bool dense = dense_products(s);
  const Pattern pat = make_pattern(indices, s, !dense, false);
  const at::Tensor v = values.contiguous();
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = s.out;
  const at::Tensor x2 = x.reshape({s.N, s.in}).contiguous();
  if (dense) {
    return at::linear(x2, dense_weight(weight, pat, v), bias).view(out_shape);
  }
  at::Tensor y = at::linear(x2, weight, bias).contiguous();
  if (s.nnz > 0 && s.N > 0) sparse_matmul(x2, pat, s, v, false, y);
  return y.view(out_shape);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sparse_delta_linear_bwd(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& indices, const at::Tensor& values, bool need_x, bool need_values,
    bool need_bias) {
  const Shapes s = check_inputs(x, weight, indices, values, c10::nullopt);
  check_like(kOp, "grad_out", grad_out, x, "x");
  std::vector<int64_t> dy_shape(x.sizes().begin(), x.sizes().end());
  dy_shape.back() = s.out;
  TORCH_CHECK_VALUE(grad_out.sizes() == at::IntArrayRef(dy_shape), kOp,
                    ": grad_out must have shape ", c10::str(dy_shape), ", got ",
                    shape_str(grad_out));
  const at::Tensor dy = grad_out.reshape({s.N, s.out}).contiguous();
  const at::Tensor x2 = x.reshape({s.N, s.in}).contiguous();
  const at::Tensor v = values.contiguous();
  const bool dense_x = dense_products(s);
  const bool dense_dv = dense_grad(s, x.is_cuda());
  const bool sparse_x = need_x && !dense_x && s.nnz > 0;
  const bool sparse_dv = need_values && !dense_dv && s.N > 0 && s.nnz > 0;
  const Pattern pat = make_pattern(indices, s, sparse_x || sparse_dv, sparse_x);
  auto empty = [&] { return at::empty({0}, x.options()); };

  at::Tensor dx = empty(), dvalues = empty(), dbias = empty();
  if (need_x) {
    if (dense_x) {
      dx = at::mm(dy, dense_weight(weight, pat, v));
    } else {
      dx = at::mm(dy, weight).contiguous();
      if (s.nnz > 0 && s.N > 0) sparse_matmul(dy, pat, s, v, true, dx);
    }
    dx = dx.view(x.sizes());
  }
  if (need_values) {
    if (dense_dv || s.N == 0) {
      dvalues = at::mm(dy.t(), x2).view({-1}).index({pat.flat});
    } else {
      dvalues = at::empty({s.nnz}, x.options());
      if (s.nnz > 0) sparse_grad(dy, x2, pat, s, dvalues);
    }
  }
  if (need_bias) dbias = dy.sum(0);
  return {dx, dvalues, dbias};
}

}  // namespace peft_kernels
