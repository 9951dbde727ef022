"""Drop-in PEFT layers built on the fused kernels."""
from peft_kernels.nn.lie import LieConv2d, LieLinear
from peft_kernels.nn.lora import LoRALinear, pissa_init
from peft_kernels.nn.orthogonal import OrthogonalConv2d, OrthogonalLinear, matrix_exp_orthogonal
from peft_kernels.nn.sparse import SparseDeltaLinear
from peft_kernels.nn.svd_node import SVDNodeLinear
from peft_kernels.nn.convert import inject_adapters, merge_and_unload

__all__ = ["LoRALinear", "OrthogonalLinear", "OrthogonalConv2d", "matrix_exp_orthogonal",
           "SparseDeltaLinear", "LieLinear", "LieConv2d", "pissa_init", "SVDNodeLinear",
           "inject_adapters", "merge_and_unload"]
