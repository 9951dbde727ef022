// Shared helpers of the torch-facing entry points: argument checks with messages that name the
// argument, dtype mapping to the kernels' plain enum, and device dispatch.
#pragma once
#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <string>

#include "kernels/common.h"

#ifdef PEFT_KERNELS_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAException.h>
#endif

namespace peft_kernels {

inline std::string shape_str(const at::Tensor& t) { return c10::str(t.sizes()); }

inline DType kernel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::kFloat32;
    case at::kDouble: return DType::kFloat64;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: TORCH_CHECK(false, "unsupported dtype ", t);
  }
}

// float64 accumulates in float64; every other floating type in float32.
inline at::ScalarType accumulation_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_floating_input(const char* op, const char* arg, const at::Tensor& t) {
  const auto dt = t.scalar_type();
  if (t.is_cuda()) {
    TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16,
                     op, ": ", arg, " must be float32, float64, float16 or bfloat16 on CUDA, got ", dt);
  } else {
    // The Python ops compute float16 / bfloat16 CPU calls in float32 when every floating-point
    // argument has that dtype, so one reaches here only beside another dtype.
    TORCH_CHECK_TYPE(dt != at::kHalf && dt != at::kBFloat16, op, ": ", arg, " has dtype ", dt,
                     " but another floating-point argument does not; on CPU, float16 and "
                     "bfloat16 calls need every floating-point argument in that dtype");
    TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kDouble, op, ": ", arg,
                     " must be float32, float64, float16 or bfloat16 on CPU, got ", dt);
  }
}

inline void check_like(const char* op, const char* arg, const at::Tensor& t, const at::Tensor& ref,
                       const char* ref_name) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), op, ": ", arg, " is on ", t.device(), " but ",
                    ref_name, " is on ", ref.device(), "; all tensors must be on one device");
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), op, ": ", arg, " has dtype ",
                   t.scalar_type(), " but ", ref_name, " has dtype ", ref.scalar_type(),
                   "; they must match");
}

inline void check_dim(const char* op, const char* arg, const at::Tensor& t, int64_t dim,
                      const char* layout) {
  TORCH_CHECK_VALUE(t.dim() == dim, op, ": ", arg, " must be ", dim, "-D ", layout, ", got shape ",
                    shape_str(t));
}

inline bool deterministic_mode() { return at::globalContext().deterministicAlgorithms(); }

#ifdef PEFT_KERNELS_WITH_CUDA
inline cudaStream_t current_stream(const at::Tensor& t) {
  return at::cuda::getCurrentCUDAStream(t.device().index()).stream();
}
#define PK_CUDA_LAUNCH(tensor, call)                             \
  do {                                                           \
    const c10::cuda::CUDAGuard pk_guard_((tensor).device());     \
    call;                                                        \
    C10_CUDA_KERNEL_LAUNCH_CHECK();                              \
  } while (0)
// launch(workspace, stream) with bytes() bytes of device scratch (null when 0) on t's device and
// current stream; inside PK_CUDA_LAUNCH. The caching allocator orders the scratch's reuse after
// the launched work on that stream, so it may be released on return.
template <typename Bytes, typename Launch>
void with_cuda_workspace(const at::Tensor& t, Bytes&& bytes, Launch&& launch) {
  const int64_t n = bytes();
  const at::Tensor scratch = n > 0 ? at::empty({n}, t.options().dtype(at::kByte)) : at::Tensor();
  launch(n > 0 ? scratch.mutable_data_ptr() : nullptr, current_stream(t));
}
#else
#define PK_CUDA_LAUNCH(tensor, call)                                                            \
  TORCH_CHECK(false, "peft_kernels was built without CUDA kernels (build_info()['cuda'] is "   \
              "False) but got CUDA tensors. Reinstall with a CUDA build of torch and nvcc on " \
              "PATH: PEFT_KERNELS_CUDA=ON pip install --no-build-isolation .")
#endif

}  // namespace peft_kernels
