"""Autograd-aware, torch.compile-safe ops over the compiled kernels."""
from peft_kernels.ops.block_rotate import block_rotate, rotated_linear
from peft_kernels.ops.expm import expm
from peft_kernels.ops.lie_weight import lie_conv2d, lie_linear, lie_weight
from peft_kernels.ops.lora_linear import draw_dropout_seed, lora_linear
from peft_kernels.ops.sparse_delta_linear import sparse_delta_linear
from peft_kernels.ops.truncated_svd import truncated_svd

__all__ = ["lora_linear", "draw_dropout_seed", "expm", "block_rotate", "rotated_linear",
           "sparse_delta_linear", "lie_weight", "lie_linear", "lie_conv2d", "truncated_svd"]
