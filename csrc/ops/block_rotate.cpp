// Torch-facing entry points of the block-diagonal rotation (csrc/kernels/block_rotate.h).
#include "ops/block_rotate.h"

#include "kernels/block_rotate.h"
#include "ops/common.h"

namespace peft_kernels {
namespace {
constexpr const char* kOp = "block_rotate";
}  // namespace

at::Tensor block_rotate(const at::Tensor& x, const at::Tensor& rotations, bool transpose) {
  TORCH_CHECK_VALUE(x.dim() >= 1, kOp, ": x must have shape [..., features], got a 0-D tensor");
  check_floating_input(kOp, "x", x);
  check_like(kOp, "rotations", rotations, x, "x");
  TORCH_CHECK_VALUE(rotations.dim() == 3 && rotations.size(1) == rotations.size(2) &&
                        rotations.size(1) >= 1,
                    kOp, ": rotations must have shape [k, b, b], got ", shape_str(rotations));
  const int64_t k = rotations.size(0), b = rotations.size(1);
  TORCH_CHECK_VALUE(x.size(-1) == k * b, kOp, ": x's last dimension (", x.size(-1),
                    ") must equal k * b = ", k * b, " for rotations of shape ",
                    shape_str(rotations));
  const at::Tensor xc = x.contiguous(), rc = rotations.contiguous();
  at::Tensor y = at::empty_like(xc);
  if (y.numel() == 0) return y;
  BlockRotateParams p;
  p.dtype = kernel_dtype(x.scalar_type());
  p.rows = xc.numel() / (k * b);
  p.blocks = k;
  p.block_size = b;
  p.x = xc.const_data_ptr();
  p.rotations = rc.const_data_ptr();
  p.transpose = transpose;
  p.y = y.mutable_data_ptr();
  if (x.is_cuda()) {
    PK_CUDA_LAUNCH(x, block_rotate_cuda(p, current_stream(x)));
  } else {
    block_rotate_cpu(p);
  }
  return y;
}

at::Tensor block_outer(const at::Tensor& a, const at::Tensor& c, int64_t block_size) {
  TORCH_CHECK_VALUE(a.dim() >= 1, kOp, ": a must have shape [..., features], got a 0-D tensor");
  check_floating_input(kOp, "a", a);
  check_like(kOp, "c", c, a, "a");
  TORCH_CHECK_VALUE(c.sizes() == a.sizes(), kOp, ": c must have a's shape ", shape_str(a), ", got ",
                    shape_str(c));
  TORCH_CHECK_VALUE(block_size >= 1 && a.size(-1) % block_size == 0, kOp, ": block_size (",
                    block_size, ") must be >= 1 and divide the last dimension ", a.size(-1));
  const int64_t b = block_size, k = a.size(-1) / b;
  const at::Tensor ac = a.contiguous(), cc = c.contiguous();
  if (ac.numel() == 0) return at::zeros({k, b, b}, a.options());
  at::Tensor out = at::empty({k, b, b}, a.options());
  BlockOuterParams p;
  p.dtype = kernel_dtype(a.scalar_type());
  p.rows = ac.numel() / (k * b);
  p.blocks = k;
  p.block_size = b;
  p.a = ac.const_data_ptr();
  p.c = cc.const_data_ptr();
  p.out = out.mutable_data_ptr();
  if (a.is_cuda()) {
    PK_CUDA_LAUNCH(a, with_cuda_workspace(
                          a, [&] { return block_outer_cuda_workspace_bytes(p); },
                          [&](void* ws, cudaStream_t st) { block_outer_cuda(p, ws, st); }));
  } else {
    block_outer_cpu(p);
  }
  return out;
}

}  // namespace peft_kernels
