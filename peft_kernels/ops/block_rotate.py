"""Block-diagonal rotation of activations: ``y[..., i] = R_i x[..., i]`` over consecutive blocks of
the last dimension, the hot path of the orthogonal adapters (no dense in×in matrix)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from peft_kernels._ext import C
from peft_kernels.ops._checks import check_fake_like, check_frozen, check_one_device, check_tensors
from peft_kernels.ops._dispatch import cpu_half_in_float32, custom_op


def _moved(t: Tensor, dim: int) -> Tensor:
    """``t`` with ``dim`` (normalised, so -1 and ndim - 1 agree) as its last dimension."""
    return t if dim == t.dim() - 1 else t.movedim(dim, -1)


def _moved_back(t: Tensor, dim: int) -> Tensor:
    return t if dim == t.dim() - 1 else t.movedim(-1, dim)


# The ops take the rotated dimension and move it last themselves: torch.compile then sees the
# caller's tensor go in and a new one come out, never a permuted view of a graph input saved
# for backward (whose symbolic strides inductor cannot order once shapes are dynamic: an
# OrthogonalConv2d failed to recompile for a second image size).
@custom_op("peft_kernels::block_rotate", cast_under_autocast=True)
def _block_rotate(x: Tensor, rotations: Tensor, transpose: bool, dim: int) -> Tensor:
    y = cpu_half_in_float32(C().block_rotate, _moved(x, dim), rotations, transpose, floating=(0, 1))
    return _moved_back(y, dim)


@_block_rotate.register_fake
def _(x, rotations, transpose, dim):
    check_fake_like("block_rotate", dict(x=x, rotations=rotations), "x")
    if rotations.dim() != 3 or rotations.shape[1] != rotations.shape[2]:
        raise ValueError(f"block_rotate: rotations must have shape [k, b, b], got "
                         f"{tuple(rotations.shape)}")
    if x.dim() < 1 or x.shape[dim] != rotations.shape[0] * rotations.shape[1]:
        raise ValueError(f"block_rotate: x's rotated dimension must equal k * b for rotations of "
                         f"shape {tuple(rotations.shape)}, got x of shape {tuple(x.shape)}")
    return _moved_back(torch.empty_like(_moved(x, dim), memory_format=torch.contiguous_format), dim)


@custom_op("peft_kernels::block_outer")
def _block_outer(a: Tensor, c: Tensor, block_size: int, dim: int) -> Tensor:
    return cpu_half_in_float32(C().block_outer, _moved(a, dim), _moved(c, dim), block_size,
                               floating=(0, 1))


@_block_outer.register_fake
def _(a, c, block_size, dim):
    if c.device != a.device:
        raise ValueError(f"block_rotate: c is on {c.device} but a is on {a.device}; "
                         "all tensors must be on one device")
    return a.new_empty((a.shape[dim] // block_size, block_size, block_size))


def _setup_context(ctx, inputs, output):
    x, rotations, transpose, dim = inputs
    ctx.save_for_backward(x, rotations)
    ctx.transpose = transpose
    ctx.dim = dim


def _backward(ctx, grad):
    x, rotations = ctx.saved_tensors
    grad = grad.to(x.dtype)
    need_x, need_r, _, _ = ctx.needs_input_grad
    # y = R x per block: dx = Rᵀ g, dR = Σ g xᵀ; with transpose (y = Rᵀ x): dx = R g, dR = Σ x gᵀ.
    dx = _block_rotate(grad, rotations, not ctx.transpose, ctx.dim) if need_x else None
    dr = None
    if need_r:
        b = rotations.shape[-1]
        dr = (_block_outer(x, grad, b, ctx.dim) if ctx.transpose
              else _block_outer(grad, x, b, ctx.dim))
    return dx, dr, None, None


_block_rotate.register_autograd(_backward, setup_context=_setup_context)


def block_rotate(x: Tensor, rotations: Tensor, *, transpose: bool = False, dim: int = -1) -> Tensor:
    """``y[..., i·b:(i+1)·b] = R_i x[..., i·b:(i+1)·b]`` (``R_iᵀ`` with ``transpose``), i.e.
    ``y = x Rᵀ`` for R = blockdiag(R_1, …, R_k), with ``rotations [k, b, b]`` and x ``[..., k·b]``;
    over dimension ``dim`` of x instead of the last with ``dim`` (e.g. -3: the channels of an
    ``[N, C, H, W]`` image batch).

    Gradients flow to x and the rotations. float32, float64, float16, bfloat16 (float32
    accumulation; the CPU converts half inputs to float32).
    """
    check_tensors("block_rotate", dict(x=x, rotations=rotations))
    if x.dim() == 0:
        dim = -1  # the kernel's own message says what x must be
    elif isinstance(dim, bool) or not isinstance(dim, int) or not -x.dim() <= dim < x.dim():
        raise ValueError(f"block_rotate: dim must be an int in [-{x.dim()}, {x.dim()}) for x of "
                         f"shape {tuple(x.shape)}, got {dim!r}")
    else:
        dim %= x.dim()
    return _block_rotate(x, rotations, bool(transpose), dim)


# ---------------------------------------------------------------------------------------------
# rotated_linear: y = base(x Mᵀ) for M = blockdiag(R_1, …, R_k) orthogonal, computed as
# F.linear(x, W M): the rotation is folded into the weight block by block (out·in·b flops), so no
# rotated copy of the activations is ever written. Backward: dx = dy (W M) is the base layer's own
# GEMM, and since M is orthogonal the gradient at the rotated input is dx Mᵀ, so
# dR_i = Σ_n (R_i dx_i) x_iᵀ = R_i · Σ_n dx_i x_iᵀ: one streaming pass over dx and x.
def _fold(weight: Tensor, rotations: Tensor) -> Tensor:
    return _block_rotate(weight, rotations.to(weight.dtype), True, weight.dim() - 1)  # W_blk R_blk


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
        outer = _block_outer(_rows(dx), _rows(x), rotations.shape[-1], 1)
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
    check_tensors("rotated_linear", dict(x=x, weight=weight, rotations=rotations), dict(bias=bias))
    check_frozen("rotated_linear", weight)
    if weight.dim() != 2:
        raise ValueError(f"rotated_linear: weight must have shape [out_features, in_features], got "
                         f"{tuple(weight.shape)}")
    if x.dim() < 1 or x.shape[-1] != weight.shape[-1]:
        raise ValueError(f"rotated_linear: x must have shape [..., {weight.shape[-1]}] to match "
                         f"weight {tuple(weight.shape)}, got {tuple(x.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"rotated_linear: bias must have shape [{weight.shape[0]}], got "
                         f"{tuple(bias.shape)}")
    if (rotations.dim() != 3 or rotations.shape[1] != rotations.shape[2]
            or rotations.shape[-1] * rotations.shape[0] != weight.shape[-1]):
        raise ValueError(f"rotated_linear: rotations must have shape [k, b, b] with k * b = in_features "
                         f"({weight.shape[-1]}), got {tuple(rotations.shape)}")
    if rotations.dtype != weight.dtype:
        raise TypeError(f"rotated_linear: rotations has dtype {rotations.dtype} but weight has "
                        f"{weight.dtype}; pass them in one dtype")
    return _rotated_linear(x, weight, bias, rotations)
