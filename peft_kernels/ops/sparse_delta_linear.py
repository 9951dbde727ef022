"""Sparse fine-tuning: ``y = x (W + Δ)ᵀ + bias`` with Δ held as k (flat index, value) entries.

Backward computes the gradient of the k values only (the masked-gradient kernel, an SDDMM): no
dense ``out×in`` weight gradient and no dense optimizer state ever exist.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from peft_kernels._ext import C
from peft_kernels.ops._checks import (check_fake_like, check_fake_shape, check_frozen,
                                      check_one_device, check_tensors)
from peft_kernels.ops._dispatch import cpu_half_in_float32, custom_op


@custom_op("peft_kernels::sparse_delta_linear_fwd", cast_under_autocast=True)
def _sparse_delta_linear_fwd(x: Tensor, weight: Tensor, indices: Tensor, values: Tensor,
                             bias: Optional[Tensor]) -> Tensor:
    return cpu_half_in_float32(C().sparse_delta_linear_fwd, x, weight, indices, values, bias,
                               floating=(0, 1, 3, 4))


@_sparse_delta_linear_fwd.register_fake
def _(x, weight, indices, values, bias):
    op = "sparse_delta_linear"
    check_fake_like(op, dict(x=x, weight=weight, values=values, bias=bias), "x")
    check_one_device(op, dict(x=x, indices=indices), "x")
    if indices.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{op}: indices must be int64 or int32, got {indices.dtype}")
    if x.dim() < 1:
        raise ValueError(f"{op}: x must have shape [..., in_features], got a 0-D tensor")
    check_fake_shape(op, "weight", weight, (None, x.shape[-1]), "[out_features, in_features]")
    check_fake_shape(op, "indices", indices, (None,), "[k]")
    check_fake_shape(op, "values", values, (indices.shape[0],), "[k], one entry per index")
    if bias is not None:
        check_fake_shape(op, "bias", bias, (weight.shape[0],), "[out_features]")
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@custom_op("peft_kernels::sparse_delta_linear_bwd")
def _sparse_delta_linear_bwd(grad_out: Tensor, x: Tensor, weight: Tensor, indices: Tensor,
                             values: Tensor, need_x: bool, need_values: bool,
                             need_bias: bool) -> tuple[Tensor, Tensor, Tensor]:
    return cpu_half_in_float32(C().sparse_delta_linear_bwd, grad_out, x, weight, indices, values,
                               need_x, need_values, need_bias, floating=(0, 1, 2, 4))


@_sparse_delta_linear_bwd.register_fake
def _(grad_out, x, weight, indices, values, need_x, need_values, need_bias):
    return (x.new_empty(x.shape) if need_x else x.new_empty((0,)),
            values.new_empty(values.shape) if need_values else x.new_empty((0,)),
            x.new_empty((weight.shape[0],)) if need_bias else x.new_empty((0,)))


def _setup_context(ctx, inputs, output):
    x, weight, indices, values, bias = inputs
    ctx.save_for_backward(x, weight, indices, values)
    ctx.has_bias = bias is not None


def _backward(ctx, grad_y):
    x, weight, indices, values = ctx.saved_tensors
    need_x, _, _, need_values, need_bias = ctx.needs_input_grad
    need_bias = bool(need_bias and ctx.has_bias)
    if not (need_x or need_values or need_bias):
        return None, None, None, None, None
    dx, dvalues, dbias = _sparse_delta_linear_bwd(grad_y, x, weight, indices, values, need_x,
                                                  need_values, need_bias)
    return (dx if need_x else None), None, None, (dvalues if need_values else None), (
        dbias if need_bias else None)


_sparse_delta_linear_fwd.register_autograd(_backward, setup_context=_setup_context)


def sparse_delta_linear(x: Tensor, weight: Tensor, indices: Tensor, values: Tensor, *,
                        bias: Optional[Tensor] = None) -> Tensor:
    """``x (W + Δ)ᵀ + bias`` with ``Δ.view(-1)[indices] = values`` and zeros elsewhere.

    x ``[..., in]``, weight ``[out, in]`` (frozen: it receives no gradient), indices ``[k]`` int64
    or int32 flat row-major positions in weight (sorted, unique, in ``[0, out·in)``: checked,
    a ``ValueError`` otherwise), values ``[k]``, bias ``[out]`` or None.

    Gradients flow to x, values and bias. The values' gradient ``dvalues[t] = Σ_n dy[n, r_t]
    x[n, c_t]`` is computed at the k entries only below 7% density on the CPU and 2% on CUDA;
    past that the dense ``dyᵀ x`` GEMM is faster and is used (on CUDA its float32 products follow
    torch's TF32 setting). The products with Δ use sparse kernels for small token counts and,
    where ``N·(in+out) ≥ 2·out·in`` or the density is ≥ 5%, one temporary ``W + Δ`` (out×in,
    rebuilt in backward, never saved), which costs less than a pass over the activations there.
    Results are deterministic. float32, float64, float16, bfloat16 (float32 accumulation; the CPU
    converts half inputs to float32; on CUDA the temporary ``W + Δ`` is rounded to the input's
    half type, as a merged weight would be, so a Δ below half an ulp of W leaves y unchanged).
    """
    check_tensors("sparse_delta_linear", dict(x=x, weight=weight, indices=indices, values=values),
                  dict(bias=bias))
    check_frozen("sparse_delta_linear", weight)
    return _sparse_delta_linear_fwd(x, weight, indices, values, bias)
