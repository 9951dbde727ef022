// Torch-facing entry points of the Lie-group Hadamard adapter (csrc/kernels/lie_weight.h): the
// fused weight generation, its backward, and the Linear / Conv2d layers' ops whose backward runs
// over blocks of output rows so that neither W_eff nor the weight gradient is ever whole.
#include "ops/lie_weight.h"

#include <ATen/ops/convolution_backward.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "kernels/lie_weight.h"
#include "ops/common.h"

namespace peft_kernels {
namespace {

constexpr const char* kOp = "lie_weight";

// A backward block first holds W_eff for some output rows (for dx), then, W_eff released, the
// weight gradient for the same rows: one block-sized tensor at a time. Full fine-tuning holds the
// dense weight gradient (out x K), so a block covers at most 1/kMinBlocks of the rows and at most
// kBlockElements elements (16 MiB in float32). Fewer, larger blocks keep the block GEMMs
// efficient: at N = 4096, 1024 x 1024 float32 (2 cores) the dx and weight-gradient products took
// 125 ms whole, 129 ms in 2 row blocks and 139-143 ms in 4. Releasing W_eff costs the gradient
// kernel an exp of its own (~1 ms per 1024 x 1024).
constexpr int64_t kBlockElements = int64_t{1} << 22;
constexpr int64_t kMinBlocks = 2;

struct Shapes {
  int64_t out, K, r;
};

Shapes check_weight(const at::Tensor& weight, const at::Tensor& A, const at::Tensor& B,
                    double scaling) {
  TORCH_CHECK_VALUE(weight.dim() >= 2, kOp, ": weight must have shape [out, ...] with at least 2 "
                    "dimensions, got ", shape_str(weight));
  check_floating_input(kOp, "weight", weight);
  check_like(kOp, "lora_A", A, weight, "weight");
  check_like(kOp, "lora_B", B, weight, "weight");
  check_dim(kOp, "lora_A", A, 2, "[r, K]");
  check_dim(kOp, "lora_B", B, 2, "[out, r]");
  const int64_t out = weight.size(0), r = A.size(0);
  const int64_t K = c10::multiply_integers(weight.sizes().begin() + 1, weight.sizes().end());
  TORCH_CHECK_VALUE(r >= 1, kOp, ": the rank r = lora_A.shape[0] must be >= 1, got lora_A of "
                    "shape ", shape_str(A));
  TORCH_CHECK_VALUE(A.size(1) == K, kOp, ": lora_A must have shape [r, ", K,
                    "] (K = the product of weight's dimensions after the first), got ",
                    shape_str(A));
  TORCH_CHECK_VALUE(B.size(0) == out && B.size(1) == r, kOp, ": lora_B must have shape [", out,
                    ", ", r, "] (out_features from weight, r from lora_A), got ", shape_str(B));
  TORCH_CHECK_VALUE(std::isfinite(scaling), kOp, ": scaling must be finite, got ", scaling);
  return {out, K, r};
}

// The fields LieWeightParams and LieWeightGradParams share, for the weight rows Wb [rows, K].
template <typename Params>
void fill_operands(Params& p, const at::Tensor& Wb, const at::Tensor& A, const at::Tensor& Bb,
                   double scaling, bool first_order) {
  p.weight = Wb.const_data_ptr();
  p.A = A.const_data_ptr();
  p.B = Bb.const_data_ptr();
  p.rows = Wb.size(0);
  p.K = Wb.size(1);
  p.r = A.size(0);
  p.scaling = scaling;
  p.first_order = first_order;
  p.dtype = kernel_dtype(Wb.scalar_type());
}

// W_eff for rows [row0, row0 + rows) of the flattened weight [out, K].
at::Tensor generate(const at::Tensor& W2, const at::Tensor& A, const at::Tensor& B2,
                    int64_t row0, int64_t rows, double scaling, bool first_order) {
  const at::Tensor Wb = W2.narrow(0, row0, rows), Bb = B2.narrow(0, row0, rows);
  at::Tensor out = at::empty({rows, W2.size(1)}, W2.options());
  LieWeightParams p;
  fill_operands(p, Wb, A, Bb, scaling, first_order);
  p.out = out.mutable_data_ptr();
  if (W2.is_cuda()) {
    PK_CUDA_LAUNCH(W2, lie_weight_cuda(p, current_stream(W2)));
  } else {
    lie_weight_cpu(p);
  }
  return out;
}

// dA += s B_b^T M_b and dB[rows] = s M_b A^T for the gradient G_b of W_eff's rows
// [row0, row0 + rows), into accumulation-type buffers; M_b = G_b * W_eff_b (exact form, the
// kernel forming exp(s B A) itself) or G_b * W_b (first order).
void accumulate_grad(const at::Tensor& G_b, const at::Tensor& W2, const at::Tensor& A,
                     const at::Tensor& B2, int64_t row0, int64_t rows, double scaling,
                     bool first_order, at::Tensor& dA, at::Tensor& dB) {
  const at::Tensor G = G_b.contiguous();
  LieWeightGradParams p;
  fill_operands(p, W2.narrow(0, row0, rows), A, B2.narrow(0, row0, rows), scaling, first_order);
  p.grad = G.const_data_ptr();
  p.dA = dA.mutable_data_ptr();
  p.dB = dB.narrow(0, row0, rows).mutable_data_ptr();
  if (W2.is_cuda()) {
    // The CUDA kernel adds dA and dB up with float atomics: the low bits vary between runs.
    at::globalContext().alertNotDeterministic("peft_kernels lie_weight backward (CUDA)");
    PK_CUDA_LAUNCH(W2, lie_weight_grad_cuda(p, current_stream(W2)));
  } else {
    lie_weight_grad_cpu(p);
  }
}

struct Operands {
  at::Tensor W2, A, B;  // contiguous; W2 is the weight flattened to [out, K]
  at::Tensor dA, dB;    // zeroed accumulation-type buffers
};

Operands operands(const at::Tensor& weight, const at::Tensor& A, const at::Tensor& B,
                  const Shapes& s) {
  const auto acc = weight.options().dtype(accumulation_type(weight.scalar_type()));
  return {weight.contiguous().view({s.out, s.K}), A.contiguous(), B.contiguous(),
          at::zeros({s.r, s.K}, acc), at::zeros({s.out, s.r}, acc)};
}

// Output rows per backward block: a multiple of `unit` (a convolution's channels per group).
int64_t block_rows(const Shapes& s, int64_t unit) {
  const int64_t by_size = kBlockElements / std::max<int64_t>(s.K, 1);
  const int64_t by_count = (s.out + kMinBlocks - 1) / kMinBlocks;
  const int64_t rows = std::max<int64_t>(1, std::min(by_size, by_count));
  return std::max<int64_t>(unit, rows / unit * unit);
}

at::Tensor empty_grad(const at::Tensor& like) { return at::empty({0}, like.options()); }

void check_bias(const c10::optional<at::Tensor>& bias, const at::Tensor& weight, int64_t out) {
  if (!bias.has_value()) return;
  check_like(kOp, "bias", *bias, weight, "weight");
  TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == out, kOp, ": bias must have shape [", out,
                    "], got ", shape_str(*bias));
}

}  // namespace

at::Tensor lie_weight_fwd(const at::Tensor& weight, const at::Tensor& A, const at::Tensor& B,
                          double scaling, bool first_order) {
  const Shapes s = check_weight(weight, A, B, scaling);
  if (weight.numel() == 0) return at::empty_like(weight, at::MemoryFormat::Contiguous);
  const Operands o = operands(weight, A, B, s);
  return generate(o.W2, o.A, o.B, 0, s.out, scaling, first_order).view(weight.sizes());
}

std::tuple<at::Tensor, at::Tensor> lie_weight_bwd(const at::Tensor& grad, const at::Tensor& weight,
                                                  const at::Tensor& A, const at::Tensor& B,
                                                  double scaling, bool first_order) {
  const Shapes s = check_weight(weight, A, B, scaling);
  check_like(kOp, "grad", grad, weight, "weight");
  TORCH_CHECK_VALUE(grad.sizes() == weight.sizes(), kOp, ": grad must have weight's shape ",
                    shape_str(weight), ", got ", shape_str(grad));
  Operands o = operands(weight, A, B, s);
  if (weight.numel() > 0) {
    accumulate_grad(grad.reshape({s.out, s.K}), o.W2, o.A, o.B, 0, s.out, scaling,
                    first_order, o.dA, o.dB);
  }
  return {o.dA.to(weight.scalar_type()), o.dB.to(weight.scalar_type())};
}

at::Tensor lie_linear_fwd(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& A,
                          const at::Tensor& B, const c10::optional<at::Tensor>& bias,
                          double scaling, bool first_order) {
  const Shapes s = check_weight(weight, A, B, scaling);
  check_dim(kOp, "weight", weight, 2, "[out_features, in_features]");
  check_like(kOp, "x", x, weight, "weight");
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) == s.K, kOp, ": x must have shape [..., ", s.K,
                    "] to match weight ", shape_str(weight), ", got ", shape_str(x));
  check_bias(bias, weight, s.out);
  return at::linear(x, lie_weight_fwd(weight, A, B, scaling, first_order), bias);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lie_linear_bwd(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& A,
    const at::Tensor& B, double scaling, bool first_order, bool need_x, bool need_A, bool need_B,
    bool need_bias) {
  const Shapes s = check_weight(weight, A, B, scaling);
  check_dim(kOp, "weight", weight, 2, "[out_features, in_features]");
  check_like(kOp, "x", x, weight, "weight");
  check_like(kOp, "grad_out", grad_out, weight, "weight");
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) == s.K, kOp, ": x must have shape [..., ", s.K,
                    "], got ", shape_str(x));
  const int64_t N = c10::multiply_integers(x.sizes().begin(), x.sizes().end() - 1);
  TORCH_CHECK_VALUE(grad_out.numel() == N * s.out && grad_out.size(-1) == s.out, kOp,
                    ": grad_out must have shape [..., ", s.out, "], got ", shape_str(grad_out));
  const at::Tensor x2 = x.reshape({N, s.K}).contiguous();
  const at::Tensor dy = grad_out.reshape({N, s.out}).contiguous();
  Operands o = operands(weight, A, B, s);
  at::Tensor dx;
  const bool need_weight_grad = need_A || need_B;
  if (need_x || need_weight_grad) {
    const int64_t step = block_rows(s, 1);
    for (int64_t row0 = 0; row0 < s.out; row0 += step) {
      const int64_t rows = std::min(step, s.out - row0);
      const at::Tensor dy_b = dy.narrow(1, row0, rows);
      if (need_x) {
        const at::Tensor W_eff = generate(o.W2, o.A, o.B, row0, rows, scaling, first_order);
        dx = dx.defined() ? dx.addmm_(dy_b, W_eff) : at::mm(dy_b, W_eff);
      }  // W_eff's block is released before the gradient's block exists
      if (need_weight_grad) {
        accumulate_grad(at::mm(dy_b.t(), x2), o.W2, o.A, o.B, row0, rows, scaling,
                        first_order, o.dA, o.dB);
      }
    }
    if (need_x && !dx.defined()) dx = at::zeros({N, s.K}, x.options());  // out = 0
  }
  const auto dtype = weight.scalar_type();
  return {need_x ? dx.view(x.sizes()) : empty_grad(x), need_A ? o.dA.to(dtype) : empty_grad(x),
          need_B ? o.dB.to(dtype) : empty_grad(x),
          need_bias ? dy.sum({0}, false, accumulation_type(dtype)).to(dtype) : empty_grad(x)};
}

at::Tensor lie_conv2d_fwd(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& A,
                          const at::Tensor& B, const c10::optional<at::Tensor>& bias,
                          at::IntArrayRef stride, at::IntArrayRef padding,
                          at::IntArrayRef dilation, int64_t groups, double scaling,
                          bool first_order) {
  const Shapes s = check_weight(weight, A, B, scaling);
  check_dim(kOp, "weight", weight, 4, "[out_channels, in_channels / groups, kh, kw]");
  check_like(kOp, "x", x, weight, "weight");
  check_bias(bias, weight, s.out);
  return at::conv2d(x, lie_weight_fwd(weight, A, B, scaling, first_order), bias, stride, padding,
                    dilation, groups);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lie_conv2d_bwd(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& A,
    const at::Tensor& B, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
    int64_t groups, double scaling, bool first_order, bool need_x, bool need_A, bool need_B,
    bool need_bias) {
  const Shapes s = check_weight(weight, A, B, scaling);
  check_dim(kOp, "weight", weight, 4, "[out_channels, in_channels / groups, kh, kw]");
  check_like(kOp, "x", x, weight, "weight");
  check_like(kOp, "grad_out", grad_out, weight, "weight");
  TORCH_CHECK_VALUE(groups >= 1 && s.out % groups == 0, kOp, ": groups (", groups,
                    ") must divide out_channels ", s.out);
  const bool batched = x.dim() == 4;
  const at::Tensor x4 = (batched ? x : x.unsqueeze(0)).contiguous();
  const at::Tensor dy = (batched ? grad_out : grad_out.unsqueeze(0)).contiguous();
  const int64_t out_per_group = s.out / groups, in_per_group = weight.size(1);
  Operands o = operands(weight, A, B, s);
  at::Tensor dx;
  const bool need_weight_grad = need_A || need_B;
  if (need_x || need_weight_grad) {
    // Blocks of whole groups: a block's output channels read only its groups' input channels.
    const int64_t step = block_rows(s, out_per_group);
    const std::vector<int64_t> kernel_shape(weight.sizes().begin() + 1, weight.sizes().end());
    for (int64_t row0 = 0; row0 < s.out; row0 += step) {
      const int64_t rows = std::min(step, s.out - row0);
      const int64_t group0 = row0 / out_per_group, block_groups = rows / out_per_group;
      const int64_t channel0 = groups == 1 ? 0 : group0 * in_per_group;
      const int64_t channels = groups == 1 ? x4.size(1) : block_groups * in_per_group;
      const at::Tensor x_b = x4.narrow(1, channel0, channels);
      const at::Tensor dy_b = dy.narrow(1, row0, rows).contiguous();
      std::vector<int64_t> block_shape{rows};
      block_shape.insert(block_shape.end(), kernel_shape.begin(), kernel_shape.end());
      const int64_t block_groups_arg = groups == 1 ? 1 : block_groups;
      if (need_x) {
        const at::Tensor W_eff = generate(o.W2, o.A, o.B, row0, rows, scaling, first_order);
        const at::Tensor dx_b = std::get<0>(at::convolution_backward(
            dy_b, x_b, W_eff.view(block_shape), c10::nullopt, stride, padding, dilation, false,
            {0, 0}, block_groups_arg, {true, false, false}));
        // Without groups every block adds to all of dx; with groups the blocks' channels are
        // disjoint and together cover x's.
        if (groups == 1) {
          dx = dx.defined() ? dx.add_(dx_b) : dx_b;
        } else {
          if (!dx.defined()) dx = at::empty_like(x4);
          dx.narrow(1, channel0, channels).copy_(dx_b);
        }
      }  // W_eff's block is released before the gradient's block exists
      if (need_weight_grad) {
        // The weight-gradient product reads only the weight's shape: W's own rows stand in.
        const at::Tensor G_b = std::get<1>(at::convolution_backward(
            dy_b, x_b, o.W2.narrow(0, row0, rows).view(block_shape), c10::nullopt, stride,
            padding, dilation, false, {0, 0}, block_groups_arg, {false, true, false}));
        accumulate_grad(G_b.reshape({rows, s.K}), o.W2, o.A, o.B, row0, rows, scaling,
                        first_order, o.dA, o.dB);
      }
    }
  }
  if (need_x && !dx.defined()) dx = at::zeros_like(x4);  // no output channels
  const auto dtype = weight.scalar_type();
  return {need_x ? (batched ? dx : dx.squeeze(0)) : empty_grad(x),
          need_A ? o.dA.to(dtype) : empty_grad(x), need_B ? o.dB.to(dtype) : empty_grad(x),
          need_bias ? dy.sum({0, 2, 3}, false, accumulation_type(dtype)).to(dtype)
                    : empty_grad(x)};
}

}  // namespace peft_kernels
