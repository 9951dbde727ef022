"""Drop-in PEFT layers built on the fused kernels."""
from peft_kernels.nn.lie import LieConv2d, LieLinear
from peft_kernels.nn.lora import LoRALinear
from peft_kernels.nn.orthogonal import OrthogonalConv2d, OrthogonalLinear, matrix_exp_orthogonal
from peft_kernels.nn.sparse import SparseDeltaLinear

__all__ = ["LoRALinear", "OrthogonalLinear", "OrthogonalConv2d", "matrix_exp_orthogonal",
           "SparseDeltaLinear", "LieLinear", "LieConv2d"]
