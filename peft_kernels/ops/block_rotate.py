"""Block-diagonal rotation of activations: ``y[..., i] = R_i x[..., i]`` over consecutive blocks of
the last dimension, the hot path of the orthogonal adapters (no dense in×in matrix)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from peft_kernels._ext import C
from peft_kernels.ops._checks import check_frozen, check_one_device
from peft_kernels.ops._dispatch import cpu_half_in_float32, custom_op


@custom_op("peft_kernels::block_rotate", cast_under_autocast=True)
def _block_rotate(x: Tensor, rotations: Tensor, transpose: bool) -> Tensor:
    return cpu_half_in_float32(C().block_rotate, x, rotations, transpose, floating=(0, 1))


@_block_rotate.register_fake
def _(x, rotations, transpose):
    if rotations.device != x.device:
        raise ValueError(f"block_rotate: rotations is on {rotations.device} but x is on {x.device}; "
                         "all tensors must be on one device")
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@custom_op("peft_kernels::block_outer")
def _block_outer(a: Tensor, c: Tensor, block_size: int) -> Tensor:
    return cpu_half_in_float32(C().block_outer, a, c, block_size, floating=(0, 1))


@_block_outer.register_fake
def _(a, c, block_size):
    if c.device != a.device:
        raise ValueError(f"block_rotate: c is on {c.device} but a is on {a.device}; "
                         "all tensors must be on one device")
    return a.new_empty((a.shape[-1] // block_size, block_size, block_size))


def _setup_context(ctx, inputs, output):
    x, rotations, transpose = inputs
    ctx.save_for_backward(x, rotations)
    ctx.transpose = transpose


def _backward(ctx, grad):
    x, rotations = ctx.saved_tensors
    grad = grad.to(x.dtype)
    need_x, need_r, _ = ctx.needs_input_grad
    # y = R x per block: dx = Rᵀ g, dR = Σ g xᵀ; with transpose (y = Rᵀ x): dx = R g, dR = Σ x gᵀ.
    dx = _block_rotate(grad, rotations, not ctx.transpose) if need_x else None
    dr = None
    if need_r:
        b = rotations.shape[-1]
        dr = _block_outer(x, grad, b) if ctx.transpose else _block_outer(grad, x, b)
    return dx, dr, None


_block_rotate.register_autograd(_backward, setup_context=_setup_context)


def block_rotate(x: Tensor, rotations: Tensor, *, transpose: bool = False) -> Tensor:
    """``y[..., i·b:(i+1)·b] = R_i x[..., i·b:(i+1)·b]`` (``R_iᵀ`` with ``transpose``), i.e.
    ``y = x Rᵀ`` for R = blockdiag(R_1, …, R_k), with ``rotations [k, b, b]`` and x ``[..., k·b]``.

    Gradients flow to x and the rotations. float32, float64, float16, bfloat16 (float32
    accumulation; the CPU converts half inputs to float32).
    """
    return _block_rotate(x, rotations, bool(transpose))


# ---------------------------------------------------------------------------------------------
# rotated_linear: y = base(x Mᵀ) for M = blockdiag(R_1, …, R_k) orthogonal, computed as
# F.linear(x, W M): the rotation is folded into the weight block by block (out·in·b flops), so no
# rotated copy of the activations is ever written. Backward: dx = dy (W M) is the base layer's own
# GEMM, and since M is orthogonal the gradient at the rotated input is dx Mᵀ, so
# dR_i = Σ_n (R_i dx_i) x_iᵀ = R_i · Σ_n dx_i x_iᵀ: one streaming pass over dx and x.
def _fold(weight: Tensor, rotations: Tensor) -> Tensor:
    return _block_rotate(weight, rotations.to(weight.dtype), True)  # W_blk R_blk


@custom_op("peft_kernels::rotated_linear", cast_under_autocast=True)
def _rotated_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], rotations: Tensor) -> Tensor:
    return torch.nn.functional.linear(x, _fold(weight, rotations), bias)


@_rotated_linear.register_fake
def _(x, weight, bias, rotations):
    check_one_device("rotated_linear", dict(x=x, weight=weight, bias=bias, rotations=rotations), "x")
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _rl_setup_context(ctx, inputs, output):
    x, weight, bias, rotations = inputs
    ctx.save_for_backward(x, weight, rotations)
    ctx.has_bias = bias is not None


def _rows(t: Tensor) -> Tensor:
    """``t [..., d]`` as ``[rows, d]`` (also when d or the rows are 0, where reshape(-1, d) fails)."""
    return t.reshape(t.shape[:-1].numel(), t.shape[-1])


def _rl_backward(ctx, dy):
    x, weight, rotations = ctx.saved_tensors
    need_x, _, need_bias, need_r = ctx.needs_input_grad
    dx = dr = dbias = None
    if need_x or need_r:
        dx = torch.matmul(dy, _fold(weight, rotations))
    if need_r:
        outer = _block_outer(_rows(dx), _rows(x), rotations.shape[-1])
        dr = torch.matmul(rotations, outer.to(rotations.dtype))
    if need_bias and ctx.has_bias:
        dbias = _rows(dy).sum(0)
    return (dx if need_x else None), None, dbias, dr


_rotated_linear.register_autograd(_rl_backward, setup_context=_rl_setup_context)


def rotated_linear(x: Tensor, weight: Tensor, rotations: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``F.linear(x Mᵀ, weight, bias)`` with ``M = blockdiag(R_1, …, R_k)``, ``rotations [k, b, b]``
    **orthogonal** (e.g. from :func:`~peft_kernels.ops.expm` of skew-symmetric matrices).

    The rotation is folded into the weight block by block, so the cost is the base linear's plus
    O(out·in·b) forward and one pass over ``dx`` and ``x`` backward. The gradient of the rotations
    uses ``M⁻¹ = Mᵀ``: it is exact for orthogonal rotations and wrong otherwise. weight must be
    frozen (it receives no gradient).
    """
    check_frozen("rotated_linear", weight)
    if rotations.dim() != 3 or rotations.shape[-1] * rotations.shape[0] != weight.shape[-1]:
        raise ValueError(f"rotated_linear: rotations must have shape [k, b, b] with k * b = in_features "
                         f"({weight.shape[-1]}), got {tuple(rotations.shape)}")
    return _rotated_linear(x, weight, bias, rotations)
