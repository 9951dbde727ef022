#pragma once
#include <ATen/core/Tensor.h>

namespace peft_kernels {

// y[..., blk] = R_blk x[..., blk] (R_blk^T with transpose) over the last dimension of x
// [..., k*b]; rotations [k, b, b].
at::Tensor block_rotate(const at::Tensor& x, const at::Tensor& rotations, bool transpose);

// [k, b, b]: sum over every leading index of a[..., blk] c[..., blk]^T.
at::Tensor block_outer(const at::Tensor& a, const at::Tensor& c, int64_t block_size);

}  // namespace peft_kernels
