#include <torch/extension.h>
#include <torch/version.h>

#include "cpu/cpu_features.h"
#include "ops/block_rotate.h"
#include "ops/expm.h"
#include "ops/lie_weight.h"
#include "ops/lora_linear.h"
#include "ops/sparse_delta_linear.h"
#include "ops/truncated_svd.h"

#ifndef PK_VERSION
#define PK_VERSION "unknown"
#endif

namespace {

py::dict build_info() {
  py::dict info;
  info["version"] = PK_VERSION;
  info["torch"] = TORCH_VERSION;
#ifdef PEFT_KERNELS_WITH_CUDA
  info["cuda"] = true;
  info["cuda_version"] = PK_CUDA_VERSION;
  info["archs"] = PK_CUDA_ARCHS;
#else
  info["cuda"] = false;
  info["cuda_version"] = py::none();
  info["archs"] = "";
#endif
  info["cpu_isa"] = peft_kernels::cpu::cpu_isa_name();
  info["ops"] = std::vector<std::string>{"lora_linear", "expm", "block_rotate", "sparse_delta_linear",
                                          "lie_weight", "truncated_svd"};
  return info;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "peft_kernels C++/CUDA kernels; use the peft_kernels.ops wrappers";
  // Argument errors reach Python as ValueError / TypeError with the message alone (no C++
  // backtrace); torch's generic translation would make every c10::Error a RuntimeError.
  py::register_local_exception_translator([](std::exception_ptr error) {
    try {
      if (error) std::rethrow_exception(error);
    } catch (const c10::ValueError& e) {
      PyErr_SetString(PyExc_ValueError, e.what_without_backtrace());
    } catch (const c10::TypeError& e) {
      PyErr_SetString(PyExc_TypeError, e.what_without_backtrace());
    } catch (const c10::Error& e) {
      PyErr_SetString(PyExc_RuntimeError, e.what_without_backtrace());
    }
  });
  m.def("build_info", &build_info, "How this extension was built");
  m.def("lora_linear_fwd", &peft_kernels::lora_linear_fwd, py::arg("x"), py::arg("weight"),
        py::arg("lora_A"), py::arg("lora_B"), py::arg("bias"), py::arg("seed"), py::arg("scaling"),
        py::arg("dropout_p"), py::arg("activation"));
  m.def("lora_linear_bwd", &peft_kernels::lora_linear_bwd, py::arg("grad_out"), py::arg("x"),
        py::arg("weight"), py::arg("lora_A"), py::arg("lora_B"), py::arg("pre"), py::arg("seed"),
        py::arg("scaling"), py::arg("dropout_p"), py::arg("activation"), py::arg("need_x"),
        py::arg("need_A"), py::arg("need_B"), py::arg("need_bias"));
  m.def("expm_fwd", &peft_kernels::expm_fwd, py::arg("A"));
  m.def("expm_bwd", &peft_kernels::expm_bwd, py::arg("A"), py::arg("grad"));
  m.def("expm_batched", &peft_kernels::expm_batched, py::arg("A"), py::arg("grad") = py::none());
  m.def("truncated_svd", &peft_kernels::truncated_svd, py::arg("A"), py::arg("k"),
        py::arg("niter"), py::arg("oversample"), py::arg("method"));
  m.def("svd_jacobi_columns", &peft_kernels::jacobi_svd_columns, py::arg("X"));
  m.def("svd_orthonormalize_rows", &peft_kernels::orthonormalize_rows, py::arg("Q"));
  m.def("block_rotate", &peft_kernels::block_rotate, py::arg("x"), py::arg("rotations"),
        py::arg("transpose"));
  m.def("block_outer", &peft_kernels::block_outer, py::arg("a"), py::arg("c"),
        py::arg("block_size"));
  m.def("sparse_delta_linear_fwd", &peft_kernels::sparse_delta_linear_fwd, py::arg("x"),
        py::arg("weight"), py::arg("indices"), py::arg("values"), py::arg("bias"));
  m.def("sparse_delta_linear_bwd", &peft_kernels::sparse_delta_linear_bwd, py::arg("grad_out"),
        py::arg("x"), py::arg("weight"), py::arg("indices"), py::arg("values"), py::arg("need_x"),
        py::arg("need_values"), py::arg("need_bias"));
  m.def("lie_weight_fwd", &peft_kernels::lie_weight_fwd, py::arg("weight"), py::arg("lora_A"),
        py::arg("lora_B"), py::arg("scaling"), py::arg("first_order"));
  m.def("lie_weight_bwd", &peft_kernels::lie_weight_bwd, py::arg("grad"), py::arg("weight"),
        py::arg("lora_A"), py::arg("lora_B"), py::arg("scaling"), py::arg("first_order"));
  m.def("lie_linear_fwd", &peft_kernels::lie_linear_fwd, py::arg("x"), py::arg("weight"),
        py::arg("lora_A"), py::arg("lora_B"), py::arg("bias"), py::arg("scaling"),
        py::arg("first_order"));
  m.def("lie_linear_bwd", &peft_kernels::lie_linear_bwd, py::arg("grad_out"), py::arg("x"),
        py::arg("weight"), py::arg("lora_A"), py::arg("lora_B"), py::arg("scaling"),
        py::arg("first_order"), py::arg("need_x"), py::arg("need_A"), py::arg("need_B"),
        py::arg("need_bias"));
  m.def("lie_conv2d_fwd", &peft_kernels::lie_conv2d_fwd, py::arg("x"), py::arg("weight"),
        py::arg("lora_A"), py::arg("lora_B"), py::arg("bias"), py::arg("stride"),
        py::arg("padding"), py::arg("dilation"), py::arg("groups"), py::arg("scaling"),
        py::arg("first_order"));
  m.def("lie_conv2d_bwd", &peft_kernels::lie_conv2d_bwd, py::arg("grad_out"), py::arg("x"),
        py::arg("weight"), py::arg("lora_A"), py::arg("lora_B"), py::arg("stride"),
        py::arg("padding"), py::arg("dilation"), py::arg("groups"), py::arg("scaling"),
        py::arg("first_order"), py::arg("need_x"), py::arg("need_A"), py::arg("need_B"),
        py::arg("need_bias"));
}
