// Torch-facing entry points of the fused low-rank adapter matmul:
//   y = x W^T + bias + s * act(drop(x) A^T) B^T
// Validation happens here, once; the kernels (csrc/cpu, csrc/cuda) see plain params structs.
#include "ops/lora_linear.h"

#include <cmath>

#include "kernels/lora_linear.h"
#include "ops/common.h"

namespace peft_kernels {
namespace {

constexpr const char* kOp = "lora_linear";
enum Activation : int64_t { kIdentity = 0, kRelu = 1, kGelu = 2, kSilu = 3 };

struct Shapes {
  int64_t N, in, out, r;
};

Shapes check_inputs(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_A,
                    const at::Tensor& lora_B, const c10::optional<at::Tensor>& bias,
                    const c10::optional<at::Tensor>& seed, double scaling, double dropout_p,
                    int64_t activation) {
  TORCH_CHECK_VALUE(x.dim() >= 1, kOp, ": x must have shape [..., in_features], got a 0-D tensor");
  check_floating_input(kOp, "x", x);
  check_dim(kOp, "weight", weight, 2, "[out_features, in_features]");
  check_dim(kOp, "lora_A", lora_A, 2, "[r, in_features]");
  check_dim(kOp, "lora_B", lora_B, 2, "[out_features, r]");
  check_like(kOp, "weight", weight, x, "x");
  check_like(kOp, "lora_A", lora_A, x, "x");
  check_like(kOp, "lora_B", lora_B, x, "x");
  const int64_t in = x.size(-1), out = weight.size(0), r = lora_A.size(0);
  TORCH_CHECK_VALUE(weight.size(1) == in, kOp, ": weight must have shape [out_features, ", in,
                    "] to match x's last dimension, got ", shape_str(weight));
  TORCH_CHECK_VALUE(r >= 1, kOp, ": the rank r = lora_A.shape[0] must be >= 1, got lora_A of shape ",
                    shape_str(lora_A));
  TORCH_CHECK_VALUE(lora_A.size(1) == in, kOp, ": lora_A must have shape [r, ", in,
                    "] to match x's last dimension, got ", shape_str(lora_A));
  TORCH_CHECK_VALUE(lora_B.size(0) == out && lora_B.size(1) == r, kOp, ": lora_B must have shape [",
                    out, ", ", r, "] (out_features from weight, r from lora_A), got ",
                    shape_str(lora_B));
  if (bias.has_value()) {
    check_like(kOp, "bias", *bias, x, "x");
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == out, kOp, ": bias must have shape [", out,
                      "], got ", shape_str(*bias));
  }
  TORCH_CHECK_VALUE(std::isfinite(scaling), kOp, ": scaling must be finite, got ", scaling);
  TORCH_CHECK_VALUE(dropout_p >= 0.0 && dropout_p < 1.0, kOp,
                    ": dropout_p must be in [0, 1), got ", dropout_p);
  TORCH_CHECK_VALUE(activation >= kIdentity && activation <= kSilu, kOp,
                    ": activation code must be 0 (none), 1 (relu), 2 (gelu) or 3 (silu), got ",
                    activation);
  if (dropout_p > 0.0) {
    TORCH_CHECK_VALUE(seed.has_value(), kOp, ": dropout_p > 0 needs a dropout seed tensor");
    TORCH_CHECK_VALUE(seed->scalar_type() == at::kLong && seed->numel() == 1, kOp,
                      ": seed must be a one-element int64 tensor, got dtype ",
                      seed->scalar_type(), " and shape ", shape_str(*seed));
    TORCH_CHECK_VALUE(seed->device() == x.device(), kOp, ": seed is on ", seed->device(),
                      " but x is on ", x.device());
  }
  const int64_t N = c10::multiply_integers(x.sizes().begin(), x.sizes().end() - 1);
  return Shapes{N, in, out, r};
}

DropoutParams dropout_params(const c10::optional<at::Tensor>& seed_contig, double p) {
  DropoutParams d;
  if (p > 0.0) {
    d.seed = seed_contig->data_ptr<int64_t>();
    d.threshold = dropout_threshold_for(p);
    d.scale = 1.0 / (1.0 - p);
  }
  return d;
}

// The merged-weight path x (W + s B A)^T replaces two passes over N x out / N x in activations
// by two out x in weight updates; it applies only without dropout or nonlinearity, and only in
// float32/float64 where folding s B A into W loses nothing that the unmerged sum keeps.
bool use_merged_weight(const Shapes& s, at::ScalarType dtype, double p, int64_t act) {
  if (p > 0.0 || act != kIdentity) return false;
  if (dtype != at::kFloat && dtype != at::kDouble) return false;
  if (s.in == 0) return false;  // nothing to merge; x A^T is zeros
  return s.N * (s.in + s.out) >= 2 * s.in * s.out;
}

// W + s B A, the weight of the merged path (rebuilt in each direction, never saved).
at::Tensor merged_weight(const at::Tensor& weight, const at::Tensor& A, const at::Tensor& B,
                         double scaling) {
  return at::addmm(weight, B, A, 1.0, scaling);
}

// On the CPU the merged path keeps no pre: its backward forms x A^T again in the pass that reads
// x and dy together (lora_dy_pass_cpu with x), and the forward returns zeros for pre. That
// saves the forward's pass over x (~3 ms of a 69 ms forward at N = 4096, 1024 x 1024, r = 16).
bool recompute_pre(const at::Tensor& x, const Shapes& s, double p, int64_t act) {
  return !x.is_cuda() && use_merged_weight(s, x.scalar_type(), p, act);
}

// act(pre) (pre itself for the identity).
at::Tensor apply_activation(const at::Tensor& pre, int64_t act) {
  switch (act) {
    case kRelu: return at::relu(pre);
    case kGelu: return at::gelu(pre);
    case kSilu: return at::silu(pre);
    default: return pre;
  }
}

// d pre = s * g * act'(pre), through ATen's own activation backward kernels.
at::Tensor activation_backward(const at::Tensor& g, const at::Tensor& pre, int64_t act,
                               double scaling) {
  at::Tensor gs = scaling == 1.0 ? g : g * scaling;
  switch (act) {
    case kRelu: return at::threshold_backward(gs, pre, 0);
    case kGelu: return at::gelu_backward(gs, pre);
    case kSilu: return at::silu_backward(gs, pre);
    default: return gs;
  }
}

std::vector<int64_t> with_last(at::IntArrayRef sizes, int64_t last) {
  std::vector<int64_t> v(sizes.begin(), sizes.end());
  v.back() = last;
  return v;
}

// ---- CUDA: every product through cuBLAS (csrc/cuda/lora_linear.cu says why), the dropout mask
// applied by lora_dropout_cuda.

// Rows of mask * x materialised at a time: bounds the workspace to about this many bytes. Each
// chunk costs a mask launch and a GEMM (and in the backward an add): at 16 MiB the N = 8192,
// in = 4096 bfloat16 step took 4 chunks per pass and measured host-bound (1.26 ms of host time
// per step against 1.08 ms on the GPU).
constexpr int64_t kDropoutChunkBytes = int64_t{64} << 20;

// a b with the result in the accumulation type: cuBLAS accumulates half types in float32 and
// writes float32 (no rounding of the rank-r results to 8 mantissa bits).
at::Tensor mm_acc(const at::Tensor& a, const at::Tensor& b) {
  const auto acc = accumulation_type(a.scalar_type());
  return acc == a.scalar_type() ? at::mm(a, b) : at::mm(a, b, acc);
}

void mm_acc_out(at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  const auto acc = accumulation_type(a.scalar_type());
  if (acc == a.scalar_type()) {
    at::mm_out(out, a, b);
  } else {
    at::mm_out(out, a, b, acc);
  }
}

// The rank-r float32 operands of the half-type weight-gradient products (a for dB, dpre for dA
// and dx), times `scale`, enter cuBLAS as [hi, lo] with hi = rn(v), lo = rn(v - hi): hi + lo
// carries about 16 (bfloat16) / 22 (float16) significant bits where hi alone has 8 / 11, so the
// products keep close to float32 accuracy (float16 dA measured 2.3e-2 absolute off the float64
// reference with hi alone, against 1e-2 allowed) at the price of rank 2r in skinny products that
// are memory-bound anyway. The partner operand is repeated along the rank dimension (rank_pair),
// or the two halves of the result summed (fold_pair). float32 / float64 are only scaled.
at::Tensor rank_operand(const at::Tensor& v, at::ScalarType dtype, double scale) {
  if (v.scalar_type() == dtype) return scale == 1.0 ? v : v * scale;
  const at::Tensor src = v.contiguous();
  at::Tensor pair = at::empty({v.size(0), 2 * v.size(1)}, v.options().dtype(dtype));
  LoraRankPairParams p;
  p.src = src.data_ptr();
  p.dst = pair.data_ptr();
  p.rows = v.size(0);
  p.r = v.size(1);
  p.scale = scale;
  p.dtype = kernel_dtype(dtype);
  PK_CUDA_LAUNCH(v, lora_rank_pair_cuda(p, current_stream(v)));
  return pair;
}

at::Tensor rank_pair(const at::Tensor& t, int64_t dim) {
  return accumulation_type(t.scalar_type()) == t.scalar_type() ? t : at::cat({t, t}, dim);
}

at::Tensor fold_pair(const at::Tensor& t, int64_t dim, at::ScalarType dtype) {
  if (accumulation_type(dtype) == dtype) return t;
  const int64_t r = t.size(dim) / 2;
  return t.narrow(dim, 0, r) + t.narrow(dim, r, r);
}

void dropout_rows_cuda(const at::Tensor& src, at::Tensor& dst, int64_t row0,
                       const DropoutParams& d) {
  LoraDropoutParams p;
  p.src = src.data_ptr();
  p.dst = dst.data_ptr();
  p.rows = src.size(0);
  p.cols = src.size(1);
  p.row0 = row0;
  p.dtype = kernel_dtype(src.scalar_type());
  p.dropout = d;
  PK_CUDA_LAUNCH(src, lora_dropout_cuda(p, current_stream(src)));
}

// fn(row0, rows, (mask * x2)[row0 : row0 + rows]) over bounded row chunks, one reused workspace
// (stream order keeps a chunk's product ahead of the next chunk's overwrite). The 1 / (1 - p)
// scale is the caller's, on the float32 side.
template <typename Fn>
void for_dropped_chunks(const at::Tensor& x2, const DropoutParams& d, Fn&& fn) {
  const int64_t N = x2.size(0), in = x2.size(1);
  const int64_t chunk =
      std::max<int64_t>(1, kDropoutChunkBytes / std::max<int64_t>(1, in * x2.element_size()));
  at::Tensor workspace = at::empty({std::min(chunk, N), in}, x2.options());
  for (int64_t row0 = 0; row0 < N; row0 += chunk) {
    const int64_t rows = std::min(chunk, N - row0);
    at::Tensor dropped = workspace.narrow(0, 0, rows);
    dropout_rows_cuda(x2.narrow(0, row0, rows), dropped, row0, d);
    fn(row0, rows, dropped);
  }
}

// pre = drop(x2) A^T in the accumulation type.
at::Tensor shrink_cuda(const at::Tensor& x2, const at::Tensor& A, const DropoutParams& d) {
  if (!d.enabled()) return mm_acc(x2, A.t());
  at::Tensor pre = at::empty({x2.size(0), A.size(0)},
                             x2.options().dtype(accumulation_type(x2.scalar_type())));
  for_dropped_chunks(x2, d, [&](int64_t row0, int64_t rows, const at::Tensor& masked) {
    at::Tensor slice = pre.narrow(0, row0, rows);
    mm_acc_out(slice, masked, A.t());
  });
  return pre.mul_(d.scale);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> lora_linear_fwd(const at::Tensor& x, const at::Tensor& weight,
                                                   const at::Tensor& lora_A,
                                                   const at::Tensor& lora_B,
                                                   const c10::optional<at::Tensor>& bias,
                                                   const c10::optional<at::Tensor>& seed,
                                                   double scaling, double dropout_p,
                                                   int64_t activation) {
  const Shapes s =
      check_inputs(x, weight, lora_A, lora_B, bias, seed, scaling, dropout_p, activation);
  const auto dtype = x.scalar_type();
  const auto acc = accumulation_type(dtype);
  const at::Tensor x2 = x.reshape({s.N, s.in}).contiguous();
  const at::Tensor A = lora_A.contiguous(), B = lora_B.contiguous();
  const c10::optional<at::Tensor> seed_c =
      seed.has_value() ? c10::optional<at::Tensor>(seed->contiguous()) : c10::nullopt;
  at::Tensor pre;
  if (x.is_cuda()) {
    pre = shrink_cuda(x2, A, dropout_params(seed_c, dropout_p));
  } else if (recompute_pre(x, s, dropout_p, activation)) {
    pre = at::zeros({s.N, s.r}, x.options().dtype(acc));
  } else {
    pre = at::empty({s.N, s.r}, x.options().dtype(acc));
    LoraShrinkParams sp;
    sp.x = x2.data_ptr();
    sp.A = A.data_ptr();
    sp.pre = pre.data_ptr();
    sp.N = s.N;
    sp.in = s.in;
    sp.r = s.r;
    sp.dtype = kernel_dtype(dtype);
    sp.dropout = dropout_params(seed_c, dropout_p);
    lora_shrink_cpu(sp);
  }

  at::Tensor y;
  if (use_merged_weight(s, dtype, dropout_p, activation)) {
    const at::Tensor merged = merged_weight(weight, A, B, scaling);
    y = bias.has_value() ? at::addmm(*bias, x2, merged.t()) : at::mm(x2, merged.t());
  } else {
    // The expand writes the output buffer, then the base GEMM accumulates into it (beta = 1):
    // no N x out temporary besides y itself.
    // y is rounded to the input dtype anyway: a enters the product rounded too, as in the
    // unfused layer.
    const at::Tensor a = (apply_activation(pre, activation) * scaling).to(dtype).contiguous();
    if (x.is_cuda()) {
      y = bias.has_value() ? at::addmm(*bias, a, B.t()) : at::mm(a, B.t());
    } else {
      y = at::empty({s.N, s.out}, x.options());
      const at::Tensor bias_c = bias.has_value() ? bias->contiguous() : at::Tensor();
      LoraExpandParams ep;
      ep.a = a.data_ptr();
      ep.B = B.data_ptr();
      ep.bias = bias_c.defined() ? bias_c.data_ptr() : nullptr;
      ep.y = y.data_ptr();
      ep.N = s.N;
      ep.out = s.out;
      ep.r = s.r;
      ep.dtype = kernel_dtype(dtype);
      lora_expand_cpu(ep);
    }
    y.addmm_(x2, weight.t());
  }
  return {y.view(with_last(x.sizes(), s.out)), pre.view(with_last(x.sizes(), s.r))};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lora_linear_bwd(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& pre,
    const c10::optional<at::Tensor>& seed, double scaling, double dropout_p, int64_t activation,
    bool need_x, bool need_A, bool need_B, bool need_bias) {
  const Shapes s = check_inputs(x, weight, lora_A, lora_B, c10::nullopt, seed, scaling, dropout_p,
                                activation);
  const auto dtype = x.scalar_type();
  const auto acc = accumulation_type(dtype);
  TORCH_CHECK_VALUE(grad_out.sizes() == at::IntArrayRef(with_last(x.sizes(), s.out)), kOp,
                    ": grad_out must have shape ", c10::str(with_last(x.sizes(), s.out)), ", got ",
                    shape_str(grad_out));
  check_like(kOp, "grad_out", grad_out, x, "x");
  TORCH_CHECK_VALUE(pre.numel() == s.N * s.r && pre.scalar_type() == acc, kOp,
                    ": pre must be the [..., r] accumulation-type tensor saved by the forward");

  const at::Tensor dy = grad_out.reshape({s.N, s.out}).contiguous();
  const at::Tensor x2 = x.reshape({s.N, s.in}).contiguous();
  const at::Tensor A = lora_A.contiguous(), B = lora_B.contiguous();
  const at::Tensor pre2 = pre.reshape({s.N, s.r}).contiguous();
  const c10::optional<at::Tensor> seed_c =
      seed.has_value() ? c10::optional<at::Tensor>(seed->contiguous()) : c10::nullopt;
  auto empty = [&] { return at::empty({0}, x.options()); };
  const bool merged = use_merged_weight(s, dtype, dropout_p, activation);

  if (x.is_cuda()) {
    // Rank-r operands go to cuBLAS in the input dtype (as the unfused layer does); the reductions
    // come back in the accumulation type. All products are cuBLAS: deterministic.
    const DropoutParams d = dropout_params(seed_c, dropout_p);
    const at::Tensor g = mm_acc(dy, B);
    at::Tensor dx, dA, dB, dbias;
    if (need_B) {
      const at::Tensor a = rank_operand(apply_activation(pre2, activation), dtype, scaling);
      dB = fold_pair(mm_acc(dy.t(), a), 1, dtype);
    }
    if (need_bias) dbias = at::sum(dy, {0}, false, acc);
    if (need_x || need_A) {
      // With dropout, dpre carries the 1 / (1 - p) scale: dA = dpre^T (mask * x) and
      // dx += mask * (dpre A) then need only the exact masking.
      const double dscale = d.enabled() ? d.scale : 1.0;
      const at::Tensor dpre =
          rank_operand(activation_backward(g, pre2, activation, 1.0), dtype, scaling * dscale);
      if (need_A) {
        if (!d.enabled()) {
          dA = mm_acc(dpre.t(), x2);
        } else {
          for_dropped_chunks(x2, d, [&](int64_t row0, int64_t rows, const at::Tensor& masked) {
            at::Tensor part = mm_acc(dpre.narrow(0, row0, rows).t(), masked);
            dA = dA.defined() ? dA.add_(part) : part;
          });
          if (!dA.defined()) dA = at::zeros({dpre.size(1), s.in}, x.options().dtype(acc));  // N = 0
        }
        dA = fold_pair(dA, 0, dtype);
      }
      if (need_x) {
        if (merged) {
          dx = at::mm(dy, merged_weight(weight, A, B, scaling));
        } else {
          // The adapter's share, masked in place, then the base GEMM adds to it.
          dx = at::mm(dpre, rank_pair(A, 0));
          if (d.enabled()) dropout_rows_cuda(dx, dx, 0, d);
          dx.addmm_(dy, weight);
        }
        dx = dx.view(x.sizes());
      }
    }
    return {need_x ? dx : empty(), need_A ? dA.to(dtype) : empty(),
            need_B ? dB.to(dtype) : empty(), need_bias ? dbias.to(dtype) : empty()};
  }

  at::Tensor dB = at::empty({s.out, s.r}, x.options().dtype(acc));
  at::Tensor dbias = need_bias ? at::empty({s.out}, x.options().dtype(acc)) : at::Tensor();
  LoraDyPassParams dp;
  dp.dy = dy.data_ptr();
  dp.B = B.data_ptr();
  dp.dB = dB.data_ptr();
  dp.dbias = need_bias ? dbias.data_ptr() : nullptr;
  dp.N = s.N;
  dp.out = s.out;
  dp.r = s.r;
  dp.dtype = kernel_dtype(dtype);
  at::Tensor dx, dA;
  if (recompute_pre(x, s, dropout_p, activation)) {
    // One pass over x and dy gives dA and dB (see recompute_pre); dx through the merged weight.
    dA = at::empty({s.r, s.in}, x.options().dtype(acc));
    dp.x = x2.data_ptr();
    dp.A = A.data_ptr();
    dp.dA = dA.data_ptr();
    dp.in = s.in;
    dp.scaling = scaling;
    lora_dy_pass_cpu(dp);
    if (need_x) dx = at::mm(dy, merged_weight(weight, A, B, scaling)).view(x.sizes());
    return {need_x ? dx : empty(), need_A ? dA.to(dtype) : empty(),
            need_B ? dB.to(dtype) : empty(), need_bias ? dbias.to(dtype) : empty()};
  }
  const at::Tensor a = apply_activation(pre2, activation) * scaling;
  at::Tensor g = at::empty({s.N, s.r}, x.options().dtype(acc));
  dp.a = a.data_ptr();
  dp.g = g.data_ptr();
  lora_dy_pass_cpu(dp);

  if (need_x || need_A) {
    const at::Tensor dpre = activation_backward(g, pre2, activation, scaling).contiguous();
    dA = at::empty({s.r, s.in}, x.options().dtype(acc));
    if (need_x) dx = at::empty({s.N, s.in}, x.options());
    LoraXPassParams xp;
    xp.x = x2.data_ptr();
    xp.A = A.data_ptr();
    xp.dpre = dpre.data_ptr();
    xp.dA = dA.data_ptr();
    xp.dx = dx.defined() ? dx.data_ptr() : nullptr;
    xp.N = s.N;
    xp.in = s.in;
    xp.r = s.r;
    xp.dtype = kernel_dtype(dtype);
    xp.dropout = dropout_params(seed_c, dropout_p);
    lora_x_pass_cpu(xp);
    if (need_x) {
      dx.addmm_(dy, weight);  // the adapter's share is already in dx; the base GEMM adds to it
      dx = dx.view(x.sizes());
    }
  }
  return {need_x ? dx : empty(), need_A ? dA.to(dtype) : empty(),
          need_B ? dB.to(dtype) : empty(), need_bias ? dbias.to(dtype) : empty()};
}

}  // namespace peft_kernels
